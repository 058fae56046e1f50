"""Plan a shared-prefix forward: the token prefixes a micro-batch's rows share, as a tree of segments.

Rows of one micro-batch often begin with the same tokens: a GRPO group shares its whole prompt,
and every problem of a step shares the system prompt and worked example. ``plan_prefix_tree``
finds them: a *segment* is a run of tokens ``[start, stop)`` of one row, computed once for every
row whose tokens (and LoRA slot) equal it up to ``stop``; its rows' later tokens attend to its
keys/values. Each row ends in its own *leaf* segment (its tokens after the last shared one). A
segment's parent holds the tokens right before it, so a row's *path* (root -> leaf) covers
``[0, len(row))`` exactly once.

The segments run in *waves*, one model forward each: shared segments by depth (parents first),
then every leaf in one wave, in row order. A shared segment needs at least ``min_tokens`` tokens
and two rows (smaller ones stay inside their rows' own segments: one more forward costs more than
it saves). A row's last token is never shared (every row keeps a leaf of at least one token), so a
plan with nothing shared has one wave whose leaves are the rows themselves.

Pure Python: no torch. ``tests/test_prefix.py`` checks the trees; clora.trainer.prefix runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Segment", "PrefixPlan", "plan_prefix_tree"]


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, stop)`` of ``row`` (and of every row below it), run under LoRA ``slot``."""

    row: int  # the first row that holds these tokens
    start: int  # global position of the first token
    stop: int  # global position after the last token
    parent: int | None  # index of the parent segment in PrefixPlan.segments; None: starts at position 0
    slot: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class PrefixPlan:
    segments: tuple[Segment, ...]
    waves: tuple[tuple[int, ...], ...]  # segment indices per forward, parents in earlier waves
    paths: tuple[tuple[int, ...], ...]  # per row: its segments root -> leaf

    @property
    def shared(self) -> int:
        """Number of shared (non-leaf) segments."""
        return len(self.segments) - len(self.paths)

    def positions(self) -> int:
        """Token positions run through the model, padding included (each wave is padded to its longest)."""
        return sum(self._wave_positions(w) for w in self.waves)

    def shared_positions(self) -> int:
        """Positions of the shared waves (all but the leaves)."""
        return sum(self._wave_positions(w) for w in self.waves[:-1])

    def _wave_positions(self, wave: tuple[int, ...]) -> int:
        return len(wave) * max(self.segments[s].length for s in wave)


def plan_prefix_tree(
    rows: Sequence[Sequence[int]], slots: Sequence[int] | None = None, *, min_tokens: int = 8
) -> PrefixPlan:
    """The prefix tree of ``rows`` (token ids; ``slots``: each row's LoRA slot, default all 0).

    Rows under different slots never share a segment: a tenant's keys/values depend on its adapter.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    slots = [0] * len(rows) if slots is None else list(slots)
    if len(slots) != len(rows):
        raise ValueError(f"{len(slots)} slots for {len(rows)} rows")
    if any(len(r) < 1 for r in rows):
        raise ValueError("every row needs at least one token")
    builder = _Builder(rows, slots, min_tokens)
    builder.split(list(range(len(rows))), 0, None, 0)
    depth_of = builder.depth
    leaves = set(builder.leaf_of.values())
    shared = [i for i in range(len(builder.segments)) if i not in leaves]
    waves = [
        tuple(sorted((i for i in shared if depth_of[i] == d), key=lambda i: builder.segments[i].row))
        for d in range(max((depth_of[i] for i in shared), default=-1) + 1)
    ]
    waves.append(tuple(builder.leaf_of[r] for r in range(len(rows))))
    paths = []
    for r in range(len(rows)):
        path = [builder.leaf_of[r]]
        while (parent := builder.segments[path[-1]].parent) is not None:
            path.append(parent)
        paths.append(tuple(reversed(path)))
    return PrefixPlan(segments=tuple(builder.segments), waves=tuple(waves), paths=tuple(paths))


class _Builder:
    def __init__(self, rows: Sequence[Sequence[int]], slots: list[int], min_tokens: int) -> None:
        self.rows, self.slots, self.min_tokens = rows, slots, min_tokens
        self.segments: list[Segment] = []
        self.depth: list[int] = []
        self.leaf_of: dict[int, int] = {}

    def _add(self, segment: Segment, depth: int) -> int:
        self.segments.append(segment)
        self.depth.append(depth)
        return len(self.segments) - 1

    def split(self, members: list[int], offset: int, parent: int | None, depth: int) -> None:
        """``members`` share tokens [0, offset) (computed in ``parent``); cluster them by their next
        ``min_tokens`` tokens, give each cluster of two or more its shared segment, recurse."""
        clusters: dict[object, list[int]] = {}
        for r in members:
            shareable = len(self.rows[r]) - 1  # the last token stays in the row's own leaf
            key: object = (
                (self.slots[r], tuple(self.rows[r][offset : offset + self.min_tokens]))
                if shareable - offset >= self.min_tokens
                else ("alone", r)
            )
            clusters.setdefault(key, []).append(r)
        for cluster in clusters.values():
            first = cluster[0]
            if len(cluster) == 1:
                self.leaf_of[first] = self._add(
                    Segment(first, offset, len(self.rows[first]), parent, self.slots[first]), depth
                )
                continue
            stop = min(len(self.rows[r]) - 1 for r in cluster)
            for r in cluster[1:]:
                stop = offset + _common_length(self.rows[first], self.rows[r], offset, stop)
            # stop >= offset + min_tokens: the cluster's rows agree on their next min_tokens tokens
            node = self._add(Segment(first, offset, stop, parent, self.slots[first]), depth)
            self.split(cluster, stop, node, depth + 1)


def _common_length(a: Sequence[int], b: Sequence[int], start: int, stop: int) -> int:
    """How many tokens a and b agree on from ``start``, looking no further than ``stop``."""
    n = 0
    for x, y in zip(a[start:stop], b[start:stop]):
        if x != y:
            break
        n += 1
    return n
