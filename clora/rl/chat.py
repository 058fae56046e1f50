"""Token-level ChatML rendering for multi-turn rollouts.

A conversation grows by appending: ``prompt(turn k+1) = prompt(turn k) + completion + continuation``.
The tokens the policy sampled are kept verbatim (never decoded and re-tokenized), so the
trainer scores exactly what the sampler produced. ChatML (SmolLM2, the tiny test model)::

    <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n

``initial`` is the tokenizer's own chat template; ``continuation`` renders the ChatML pieces
after an assistant completion. The constructor checks that the tokenizer's template really is
ChatML, so the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clora.errors import ConfigError

__all__ = ["ChatRenderer", "IM_START", "IM_END"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


def _as_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list or (transformers 5) a BatchEncoding."""
    if hasattr(encoded, "keys") and "input_ids" in encoded.keys():
        encoded = encoded["input_ids"]
    ids = list(encoded)
    if ids and isinstance(ids[0], (list, tuple)):  # batched form
        ids = list(ids[0])
    return [int(t) for t in ids]


def _chatml(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


class ChatRenderer:
    """Renders chat messages to token ids with a ChatML tokenizer (HF ``PreTrainedTokenizer``-like).

    ``role_map`` renames roles of env messages, e.g. ``{"tool": "user"}`` for a model that was
    never shown a ``tool`` turn; by default roles are rendered as given.
    """

    def __init__(self, tokenizer: Any, *, role_map: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.role_map = dict(role_map or {})
        self.im_start_id = self._single_token(IM_START)
        self.im_end_id = self._single_token(IM_END)
        self.generation_prompt = self._encode(f"{IM_START}assistant\n")
        try:
            rendered = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - any template failure means: not usable here
            raise ConfigError(f"tokenizer has no usable chat template: {e}") from e
        expected = _chatml(_PROBE) + f"{IM_START}assistant\n"
        if rendered != expected:
            raise ConfigError(f"ChatRenderer supports ChatML chat templates only; the template renders {rendered!r}")
        self._check_composition()

    def _check_composition(self) -> None:
        """prompt + completion + continuation must equal the template of the whole conversation."""
        answer = self._encode("A") + [self.im_end_id]
        reply = [{"role": "user", "content": "T"}]
        composed = self.initial(_PROBE) + answer + self.continuation(answer, reply)
        whole = _PROBE + [{"role": "assistant", "content": "A"}, *reply]
        templated = _as_ids(self.tokenizer.apply_chat_template(whole, add_generation_prompt=True, tokenize=True))
        if composed != templated:
            raise ConfigError(
                "ChatRenderer: appending turns does not reproduce the chat template for this tokenizer "
                f"({composed} != {templated})"
            )

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def _single_token(self, text: str) -> int:
        ids = self._encode(text)
        if len(ids) != 1:
            raise ConfigError(f"ChatRenderer needs {text!r} as one special token; the tokenizer gives {ids}")
        return ids[0]

    def _mapped(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        return [{"role": self.role_map.get(m["role"], m["role"]), "content": m["content"]} for m in messages]

    def initial(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The first prompt: the tokenizer's chat template with the generation prompt."""
        encoded = self.tokenizer.apply_chat_template(
            self._mapped(messages), add_generation_prompt=True, tokenize=True
        )
        return _as_ids(encoded)

    def continuation(self, completion_token_ids: Sequence[int], tool_messages: Sequence[dict[str, str]]) -> list[int]:
        """Tokens after an assistant completion: close its turn, the env's messages, a new assistant turn.

        If the completion did not end with ``<|im_end|>`` (cut by max_tokens or a stop string),
        the closing ``<|im_end|>`` is added here (it is a rendering token, not the model's).
        """
        ids: list[int] = []
        if not completion_token_ids or completion_token_ids[-1] != self.im_end_id:
            ids.append(self.im_end_id)
        ids += self._encode("\n" + _chatml(self._mapped(tool_messages)))
        ids += self.generation_prompt
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)
