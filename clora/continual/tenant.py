"""A continual tenant: named versions, aliases, pinned sampling, feedback, a learner, promotion, rollback.

``rt.tenant(name, continual=LearnerPolicy(...))`` attaches one ``Continual`` to the TenantHandle; the
handle's ``sample(version=...)``, ``commit``, ``promote``, ``rollback``, ``feedback``, ``learn``,
``versions`` and ``aliases`` delegate here (docs/continual.md). Its files live in
``<run_dir>/tenants/<name>/continual/`` (registry, versions, samples, feedback); with
``Runtime(resume=True)`` a tenant reopened under the same name continues from its newest committed
version (trainer state included) with every accepted feedback not yet trained pending again.
One lock orders the changes (commit, learner step, promotion, rollback); sampling takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from clora import events
from clora.checkpoint.format import TenantProgress, read_checkpoint, rng_state, write_checkpoint
from clora.continual.feedback import FeedbackLog, FeedbackRecord, SampleRecord, new_sample_id
from clora.continual.gate import Gate, Promotion, decide, gate_name, score
from clora.continual.learner import LearnerPolicy, due, feedback_data, seconds_until_due
from clora.continual.registry import Registry, VersionInfo, validate_alias
from clora.continual.serving import PinnedVersions
from clora.errors import PublishError
from clora.messages import ExportAdapter, ExportStoreState, ImportStoreState, SampleRequest, SampleResult, TrainStep

if TYPE_CHECKING:
    from clora.tenant.handle import TenantHandle

__all__ = ["Continual", "PRODUCTION", "CANDIDATE"]

PRODUCTION = "production"
CANDIDATE = "candidate"


class Continual:
    """The continual-learning side of one tenant (see the module docstring)."""

    def __init__(self, handle: TenantHandle, policy: LearnerPolicy, folder: Path) -> None:
        self.handle = handle
        self.runtime = handle.runtime
        self.policy = policy
        self.folder = folder
        self.registry = Registry(folder, handle.name)
        self.log_ = FeedbackLog(folder, max_age_s=policy.sample_max_age_s, max_samples=policy.max_samples)
        self.pinned = PinnedVersions(
            handle.name, self.runtime.ask, self.registry.adapter_dir, lambda: set(self.registry.aliases().values()),
            policy=self._policy, forget=self.runtime.scheduler.remove, max_live=policy.max_live_versions,
        )
        self._lock = asyncio.Lock()
        self._learner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._base: int | None = None  # the kept version the trainer's weights descend from (None: the head)
        self.learner_error: BaseException | None = None  # why the background learner stopped, if it did

    @property
    def _log(self) -> Any:
        return self.runtime.log.bind(tenant=self.handle.name)

    def _policy(self, key: str) -> None:
        policy = self.runtime.scheduler.policy(self.handle.name)
        self.runtime.scheduler.set_policy(key, policy.priority, policy.weight)

    # ------------------------------------------------------------------ open / close

    @classmethod
    async def open(cls, handle: TenantHandle, policy: LearnerPolicy, folder: Path, *, resume: bool) -> Continual:
        """Start fresh (the folder is cleared) or, with ``resume``, continue from the folder's registry."""
        if not resume and folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder)
        self = cls(handle, policy, folder)
        if resume:
            self.registry = Registry.load(folder, handle.name)
        await asyncio.to_thread(self.log_.open)
        head = self.registry.head
        if head is not None:
            checkpoint = await asyncio.to_thread(read_checkpoint, self.registry.state_dir(head.version))
            await self.runtime.ask(ImportStoreState(tenant=handle.name, state=checkpoint.state))
            await handle.publish()
            applied = self.registry.applied_feedback()
            self.log_.forget(applied)
            await self._compact()
            self._log.info(events.CONTINUAL_RESUMED, version=head.version, aliases=self.registry.aliases(),
                           pending=len(self.log_.pending(applied)), feedback=len(self.log_))
        else:
            await self.commit(alias=PRODUCTION)
        self._poke()
        return self

    async def close(self) -> None:
        """Stop the learner (a step in progress finishes first) and unload every pinned version."""
        if self._learner is not None:
            self._learner.cancel()
            await asyncio.wait([self._learner])
        await self.pinned.close()
        self.log_.close()

    # ------------------------------------------------------------------ versions

    async def commit(self, *, alias: str | None = None, data: int = 0, feedback: list[int] = ()) -> VersionInfo:
        """Keep the trainer's current weights as a version (a no-op if that version is kept already)."""
        async with self._lock:
            return await self._commit(alias=alias, data=data, feedback=list(feedback))

    async def _commit(self, *, alias: str | None, data: int, feedback: list[int], state: Any = None) -> VersionInfo:
        if alias is not None:
            validate_alias(alias)
        name = self.handle.name
        state = state if state is not None else await self.runtime.ask(ExportStoreState(tenant=name))
        if state.version in self.registry:
            info = self.registry.get(state.version)
        else:
            adapter = self.registry.adapter_dir(state.version)
            exported = await self.runtime.ask(ExportAdapter(tenant=name, out_dir=str(adapter)))
            if exported != state.version:
                raise PublishError(f"tenant {name!r} trained (v{exported}) while version {state.version} was being "
                                   "kept; train and commit one at a time")
            progress = TenantProgress(step=state.adam_step, rng=rng_state(random.Random(0)), accuracy_start=0.0,
                                      started_at=time.time(), tokens_sampled=0, records=[])
            await asyncio.to_thread(write_checkpoint, self.registry.state_dir(state.version), state, progress,
                                    self.runtime.base_model)
            head = self.registry.head
            parent = self._base if self._base is not None else (None if head is None else head.version)
            info = self.registry.child(state.version, parent=parent, steps=state.adam_step, data=data,
                                       feedback=feedback)
            self.registry.add(info)
            if alias is not None:
                self.registry.point(alias, info.version)
            await asyncio.to_thread(self.registry.save)  # the commit point
            self._base = info.version
            self._log.info(events.CONTINUAL_VERSION_COMMITTED, version=info.version, parent=info.parent,
                           steps=info.steps, data=info.data, feedback=len(feedback), alias=alias,
                           path=str(self.registry.version_dir(info.version)))
            return info
        if alias is not None and self.registry.aliases().get(alias) != info.version:
            self.registry.point(alias, info.version)
            await asyncio.to_thread(self.registry.save)
        return info

    async def checkout(self, version: int | str) -> VersionInfo:
        """Put a kept version's weights and optimizer state back into the trainer, so learning continues from
        it (after a rollback, say). It is kept again under a new number (the trainer's versions only go up),
        with ``version`` as its parent, and published as the serving head."""
        async with self._lock:
            source = self.registry.get(self.registry.resolve(version))
            checkpoint = await asyncio.to_thread(read_checkpoint, self.registry.state_dir(source.version))
            current = await self.runtime.ask(ExportStoreState(tenant=self.handle.name))
            state = msgspec.structs.replace(checkpoint.state, version=current.version + 1)
            await self.runtime.ask(ImportStoreState(tenant=self.handle.name, state=state))
            self._base = source.version
            info = await self._commit(alias=None, data=0, feedback=[], state=state)
        await self.handle.publish()
        self._log.info(events.CONTINUAL_CHECKED_OUT, version=info.version, source=source.version)
        return info

    def resolve(self, version: int | str) -> int:
        return self.registry.resolve(version)

    # ------------------------------------------------------------------ sampling

    async def sample(self, request: SampleRequest, version: int | str | None, *, record: bool) -> SampleResult:
        """Sample from exactly ``version`` (a number or an alias, resolved now), or the serving head (None)."""
        if version is None:
            result = await self.runtime.ask(request)
        else:
            pinned = self.registry.resolve(version)
            async with self.pinned.lease(pinned) as key:
                result = await self.runtime.ask(msgspec.structs.replace(request, tenant=key))
            result = msgspec.structs.replace(result, tenant=self.handle.name)
        if not record:
            return result
        ids, now = [], time.time()
        for completion in result.completions:
            ids.append(new_sample_id())
            self.log_.record(SampleRecord(id=ids[-1], version=result.adapter_version, prompt=result.prompt_token_ids,
                                          tokens=completion.token_ids, logprobs=completion.logprobs, at=now))
        return msgspec.structs.replace(result, sample_ids=ids)

    # ------------------------------------------------------------------ feedback and learning

    async def feedback(self, items: list[tuple[str, float]]) -> list[FeedbackRecord]:
        """Accept rewards for served samples (durably, all or none); the learner runs when due."""
        records = await asyncio.to_thread(self.log_.accept, list(items))
        pending = self.log_.pending(self.registry.applied_feedback())
        self._log.info(events.CONTINUAL_FEEDBACK, accepted=len(records), pending=len(pending))
        self._poke()
        return records

    def pending(self) -> list[FeedbackRecord]:
        return self.log_.pending(self.registry.applied_feedback())

    async def learn(self, *, force: bool = True) -> VersionInfo | None:
        """One learner step on the oldest pending feedback (``force``: even if the policy says not yet);
        returns the new version, or None when nothing was pending or it carried no signal."""
        async with self._lock:
            pending = self.pending()
            if not pending or not (force or due(self.policy, pending)):
                return None
            batch = pending[: self.policy.max_batch]
            items = [(f, s) for f in batch if (s := self.log_.sample_of(f)) is not None]
            seqs = [f.seq for f in batch]
            started = time.perf_counter()
            data = feedback_data(self.policy, items) if items else []
            if not any(a for d in data for a in d.advantages):
                self.registry.consume(seqs)
                await asyncio.to_thread(self.registry.save)
                self.log_.forget(set(seqs))
                await self._compact()
                self._log.info(events.CONTINUAL_LEARNER_SKIPPED, feedback=len(seqs), reason="no-signal")
                return None
            result = await self.runtime.ask(TrainStep(tenant=self.handle.name, data=data, loss=self.policy.loss,
                                                      copy_state=True))
            info = await self._commit(alias=self.policy.alias, data=len(data), feedback=seqs, state=result.state)
            self.log_.forget(set(seqs))
            await self._compact()
            rewards = [f.reward for f, _ in items]
            self._log.info(events.CONTINUAL_LEARNER_STEP, version=info.version, parent=info.parent, data=len(data),
                           feedback=len(seqs), first_seq=seqs[0], last_seq=seqs[-1],
                           reward_mean=round(sum(rewards) / len(rewards), 4),
                           ratio_mean=result.metrics.values.get("ratio_mean"),
                           duration_s=round(time.perf_counter() - started, 4))
            return info

    async def _compact(self) -> None:
        """Shorten samples.jsonl when it is due (clora.continual.feedback: after ``forget``)."""
        done = await asyncio.to_thread(self.log_.compact)
        if done is not None:
            self._log.info(events.CONTINUAL_SAMPLES_COMPACTED, kept=done.kept, dropped=done.dropped,
                           bytes_before=done.bytes_before, bytes_after=done.bytes_after)

    def _poke(self) -> None:
        """New feedback: wake the background learner (start it if it is not running)."""
        self._wake.set()
        if self.policy.auto and (self._learner is None or self._learner.done()) and self.pending():
            self._learner = asyncio.ensure_future(self._auto())

    async def _auto(self) -> None:
        try:
            while True:
                wait = seconds_until_due(self.policy, self.pending())
                if wait is None:
                    return
                if wait > 0:  # until max_age_s makes it due, or new feedback arrives
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                await self.learn(force=False)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the learner stops; serving goes on, the error is kept
            self.learner_error = e
            self._log.warning(events.CONTINUAL_LEARNER_FAILED, error=f"{type(e).__name__}: {e}")

    async def wait_learned(self) -> None:
        """Until the background learner has nothing due (tests, examples)."""
        while self._learner is not None and not self._learner.done():
            await asyncio.wait([self._learner])
            self._poke()
            if self._learner is not None and not self._learner.done() and not due(self.policy, self.pending()):
                return

    # ------------------------------------------------------------------ promotion and rollback

    async def promote(self, version: int | str, alias: str, gate: Gate | None, margin: float) -> Promotion:
        """Point ``alias`` at ``version`` if ``gate`` scores it above the alias's version by more than ``margin``."""
        validate_alias(alias)
        candidate = self.registry.resolve(version)
        previous = self.registry.aliases().get(alias)
        name = None if gate is None else gate_name(gate)
        cand_score = base_score = None
        if gate is not None:  # scored outside the lock: sampling pinned versions takes none
            cand_score = await score(gate, self.handle, candidate)
            if previous is not None and previous != candidate:
                base_score = await score(gate, self.handle, previous)
        ok = gate is None or decide(cand_score, base_score, margin)
        result = Promotion(tenant=self.handle.name, alias=alias, version=candidate, previous=previous, promoted=ok,
                           gate=name, score=cand_score, baseline=base_score, margin=margin)
        async with self._lock:
            if name is not None:
                self.registry.set_scores(candidate, {name: cand_score})
                if base_score is not None:
                    self.registry.set_scores(previous, {name: base_score})
            if ok:
                await self.pinned.warm(candidate)  # loaded before the alias moves: no request waits for it
                if self.registry.aliases().get(alias) != previous:
                    raise PublishError(f"alias {alias!r} moved while version {candidate} was being gated; "
                                       "promote again")
                self.registry.point(alias, candidate)
            await asyncio.to_thread(self.registry.save)
        self.pinned.release_idle()
        if ok:
            self._log.info(events.CONTINUAL_PROMOTED, alias=alias, version=candidate, previous=previous, gate=name,
                           score=cand_score, baseline=base_score, margin=margin)
        else:
            self._log.info(events.CONTINUAL_PROMOTION_REFUSED, alias=alias, version=candidate, previous=previous,
                           gate=name, score=cand_score, baseline=base_score, margin=margin)
        return result

    async def rollback(self, alias: str) -> int:
        """Point ``alias`` back at the version it pointed at before; returns that version."""
        async with self._lock:
            current, previous = self.registry.rollback(alias)
            await asyncio.to_thread(self.registry.save)
        self.pinned.release_idle()
        self._log.info(events.CONTINUAL_ROLLED_BACK, alias=alias, version=previous, from_version=current)
        return previous
