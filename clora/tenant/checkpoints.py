"""The checkpoints of one tenant's run: when to write them, what they hold, and resuming from one.

A checkpoint holds the committed state of the last completed step: a copy of the trainer's whole
store taken right after that step (in the step's own device job when the TrainStep asked for it;
it stays valid while a later step trains), the problem RNG (the data position), the step records
and the accuracy so far. Writes run in a thread alongside
the next rollout; ``before_train()`` waits for the store copy and the write before the store
changes again. The file format is clora.checkpoint.format's.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors import ActorRef
from clora import events
from clora.checkpoint.format import (
    BaseModelIdentity,
    TenantProgress,
    has_checkpoint,
    read_checkpoint,
    remove_checkpoint,
    restore_rng,
    state_digest,
    write_checkpoint,
)
from clora.checkpoint.compat import check_resumable
from clora.config import LoraConfig
from clora.errors import CheckpointError
from clora.messages import ExportStoreState, ImportStoreState, StoreState

__all__ = ["Restored", "TenantCheckpoints"]


@dataclass(frozen=True)
class Restored:
    """What a resumed tenant takes over from its checkpoint."""

    progress: TenantProgress
    rng: random.Random


class TenantCheckpoints:
    """Checkpoints of tenant ``tenant`` in ``folder``: every ``every`` steps, after ``last_step``, and on stop."""

    def __init__(
        self, folder: Path, *, tenant: str, every: int, last_step: int, base_model: BaseModelIdentity,
        lora: LoraConfig, trainer: ActorRef, log: Any,
    ) -> None:
        self.folder = folder
        self._tenant = tenant
        self._every = every
        self._last_step = last_step
        self._base_model = base_model
        self._lora = lora
        self._trainer = trainer
        self._log = log
        self._committed: TenantProgress | None = None  # progress after the last completed step
        self._committed_version = 0  # the adapter version that goes with it
        self._committed_state: asyncio.Future[StoreState] | None = None  # the store copy of that step
        self._saved_step: int | None = None  # the step of the newest checkpoint on disk
        self._saving: asyncio.Future[None] | None = None  # a checkpoint written while the next rollout runs

    @property
    def enabled(self) -> bool:
        return self._every > 0

    async def start(self, *, resume: bool) -> Restored | None:
        """Restore the checkpoint in the folder (``resume``) or delete it (a fresh run)."""
        if resume and has_checkpoint(self.folder):
            return await self._restore()
        if not resume:
            await asyncio.to_thread(remove_checkpoint, self.folder)
        return None

    def commit(self, progress: TenantProgress, version: int, *, state: StoreState | None = None) -> None:
        """A step is complete: remember its progress and its store copy: ``state`` when the step's
        TrainStep replied with one of ``version``, else one asked for in the background."""
        self._committed, self._committed_version = progress, version
        if not self.enabled:
            return
        if state is not None and state.version == version:
            self._committed_state = asyncio.get_running_loop().create_future()
            self._committed_state.set_result(state)
        else:
            self._committed_state = asyncio.ensure_future(self._trainer.ask(ExportStoreState(tenant=self._tenant)))

    async def after_step(self, step: int) -> None:
        """Start the checkpoint of the committed step when due; it runs alongside the next rollout."""
        if self.enabled and (step % self._every == 0 or step == self._last_step):
            if self._saving is not None:  # the previous checkpoint, rarely still being written
                await asyncio.shield(self._saving)
                self._saving = None
            self._saving = asyncio.ensure_future(self._save())

    async def before_train(self) -> None:
        """Wait for the store copy of the last step and the checkpoint in progress, if any; their
        errors are raised here. Cancelling the caller cancels neither (shielded)."""
        if self._committed_state is not None:
            await asyncio.shield(self._committed_state)
        if self._saving is not None:
            await asyncio.shield(self._saving)
            self._saving = None

    async def on_stop(self) -> None:
        """The run ends early: let a write in progress finish, then save the last completed step
        unless it is on disk already. Failures are logged: the run's own error matters more."""
        committed = self._committed
        try:
            if self._committed_state is not None:
                await asyncio.wait([self._committed_state])
                if not self._committed_state.cancelled():
                    self._committed_state.exception()  # retrieved here; _save() raises it again if it saves
            if self._saving is not None:
                await asyncio.wait([self._saving])
                saving, self._saving = self._saving, None
                saving.result()
            if self.enabled and committed is not None and committed.step != self._saved_step:
                await self._save()
        except Exception as e:  # the previous checkpoint stays
            self._log.warning(events.CHECKPOINT_FAILED, tenant=self._tenant, step=getattr(committed, "step", None),
                              error=f"{type(e).__name__}: {e}")

    async def _save(self) -> None:
        assert self._committed is not None and self._committed_state is not None
        progress, version = self._committed, self._committed_version
        started = time.perf_counter()
        state: StoreState = await asyncio.shield(self._committed_state)
        if state.version != version:
            raise CheckpointError(
                f"tenant {self._tenant!r}: the store copy is at version {state.version}, not version {version} "
                f"of step {progress.step}; the checkpoint of step {self._saved_step} stays"
            )
        write = asyncio.ensure_future(asyncio.to_thread(write_checkpoint, self.folder, state, progress, self._base_model))
        try:
            path, size = await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])  # a file is never left half-renamed; then honour the cancel
            if not write.cancelled():
                write.exception()
            raise
        self._saved_step = progress.step
        self._log.info(
            events.CHECKPOINT_WRITTEN, tenant=self._tenant, step=progress.step, adapter_version=state.version,
            duration_s=round(time.perf_counter() - started, 4), bytes=size, path=str(path),
        )

    async def _restore(self) -> Restored:
        """Load the checkpoint into the trainer, verify it bit for bit, and hand back its progress."""
        started = time.perf_counter()
        where = f"checkpoint of tenant {self._tenant!r} in {str(self.folder)!r}"
        ckpt = await asyncio.to_thread(read_checkpoint, self.folder)
        manifest = ckpt.manifest
        check_resumable(manifest, self._tenant, self._base_model, self._lora, where)
        rng = restore_rng(manifest.progress.rng)
        version = await self._trainer.ask(ImportStoreState(tenant=self._tenant, state=ckpt.state))
        back: StoreState = await self._trainer.ask(ExportStoreState(tenant=self._tenant))
        digest = await asyncio.to_thread(state_digest, back)
        if digest != manifest.state_digest:
            raise CheckpointError(f"{where}: the restored store differs from the checkpoint (digest {digest[:12]})")
        self._committed, self._committed_version = manifest.progress, version
        self._saved_step = manifest.progress.step
        self._log.info(
            events.CHECKPOINT_RESUMED, tenant=self._tenant, step=manifest.progress.step, adapter_version=version,
            from_path=str(ckpt.path), digest=digest, duration_s=round(time.perf_counter() - started, 4),
        )
        return Restored(progress=manifest.progress, rng=rng)
