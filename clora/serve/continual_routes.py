"""Continual learning over HTTP: ``/v1/feedback`` and the admin API (versions, promote, rollback, learn).

- ``POST /v1/feedback`` ``{"model": TENANT, "sample_id": ID, "reward": R}`` or ``{"model": TENANT,
  "feedback": [{"sample_id": ID, "reward": R}, ...]}`` (all accepted or none): rewards for completions
  the OpenAI routes served (their ``sample_ids``). Any key that may use the tenant may send feedback.
  Unknown or expired sample id: 404; a non-finite or conflicting reward: 400.
- ``GET /v1/admin/tenants/{tenant}/versions``: every kept version with its lineage, and the aliases.
- ``POST /v1/admin/tenants/{tenant}/promote`` ``{"version": 7 | "candidate", "alias": "production"}``, optionally
  gated: ``"gate": {ENV}`` (an ``EnvConfig`` as JSON, e.g. ``{"kind": "arithmetic", "difficulty": 1,
  "held_out_size": 32}``: the candidate and the alias's version are scored on that env's held-out set) and
  ``"margin": 0.05`` (the candidate must beat the alias's version by more). The reply says ``promoted`` or
  not, with both scores.
- ``POST /v1/admin/tenants/{tenant}/rollback`` ``{"alias": "production"}``.
- ``POST /v1/admin/tenants/{tenant}/learn``: one learner step on the pending feedback now.

The admin endpoints need an admin key (``"admin": true`` in the key file; without keys, loopback
clients are admins): any other key, or none, gets 403. A tenant opened without ``continual`` gets 400.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Request

from clora.continual.learner import LearnerPolicy
from clora.continual.tenant import PRODUCTION
from clora.config import EnvConfig
from clora.envs import make_env
from clora.errors import AccessDeniedError, ConfigError
from clora.serve.bodies import read_json, serve_state
from clora.serve.state import ServeState
from clora.tenant.handle import TenantHandle

__all__ = ["router", "continual_policy"]

router = APIRouter(prefix="/v1")


class _In(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class FeedbackItem(_In, kw_only=True):
    sample_id: str
    reward: float


class FeedbackIn(_In, kw_only=True):
    model: str
    sample_id: str | None = None
    reward: float | None = None
    feedback: list[FeedbackItem] | None = None

    def items(self) -> list[tuple[str, float]]:
        single = self.sample_id is not None or self.reward is not None
        if single == (self.feedback is not None) or (single and (self.sample_id is None or self.reward is None)):
            raise ConfigError("feedback: give either sample_id and reward, or a feedback list")
        if single:
            return [(self.sample_id, self.reward)]
        if not self.feedback:
            raise ConfigError("feedback: the list is empty")
        return [(f.sample_id, f.reward) for f in self.feedback]


class PromoteIn(_In, kw_only=True):
    version: int | str
    alias: str = PRODUCTION
    gate: EnvConfig | None = None  # score on this env's held-out set (clora.continual.gate)
    margin: float = 0.0


class RollbackIn(_In, kw_only=True):
    alias: str = PRODUCTION


def continual_policy(value: Any) -> LearnerPolicy | None:
    """A Tinker client's ``user_metadata["clora_continual"]``: absent / false -> None (no versions), true ->
    the default LearnerPolicy, a JSON object (or its text) -> a LearnerPolicy with those fields."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "0", "false", "no")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes")):
        return LearnerPolicy()
    try:
        fields = msgspec.json.decode(value) if isinstance(value, str) else value
        return msgspec.convert(fields, LearnerPolicy)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"user_metadata.clora_continual: true, or a LearnerPolicy as JSON ({e})") from None


def _continual(state: ServeState, request: Request, tenant: str) -> TenantHandle:
    handle = state.tenant(request.state.principal, tenant)
    handle.continual  # ConfigError (400) for a tenant without versions
    return handle


def _admin(request: Request, tenant: str) -> TenantHandle:
    if not request.state.principal.admin:
        raise AccessDeniedError("not allowed: the admin API needs an admin key")
    return _continual(serve_state(request), request, tenant)


def _version(info: Any) -> dict[str, Any]:
    return msgspec.to_builtins(info)


@router.post("/feedback")
async def feedback(request: Request) -> dict[str, Any]:
    body = await read_json(request, FeedbackIn, empty_is_object=True)
    items = body.items()
    handle = _continual(serve_state(request), request, body.model)
    records = await handle.feedback_many(items)
    return {"object": "feedback", "model": body.model,
            "accepted": [{"sample_id": r.sample, "seq": r.seq, "reward": r.reward} for r in records],
            "pending": len(handle.continual.pending())}


@router.get("/admin/tenants/{tenant}/versions")
async def versions(request: Request, tenant: str) -> dict[str, Any]:
    handle = _admin(request, tenant)
    return {"tenant": tenant, "versions": [_version(v) for v in handle.versions()], "aliases": handle.aliases(),
            "live": handle.continual.pinned.live(), "pending_feedback": len(handle.continual.pending())}


@router.post("/admin/tenants/{tenant}/promote")
async def promote(request: Request, tenant: str) -> dict[str, Any]:
    handle = _admin(request, tenant)
    body = await read_json(request, PromoteIn, empty_is_object=True)
    gate = None if body.gate is None else make_env(body.gate)
    return msgspec.to_builtins(await handle.promote(body.version, body.alias, gate=gate, margin=body.margin))


@router.post("/admin/tenants/{tenant}/rollback")
async def rollback(request: Request, tenant: str) -> dict[str, Any]:
    handle = _admin(request, tenant)
    body = await read_json(request, RollbackIn, empty_is_object=True)
    version = await handle.rollback(body.alias)
    return {"tenant": tenant, "alias": body.alias, "version": version}


@router.post("/admin/tenants/{tenant}/learn")
async def learn(request: Request, tenant: str) -> dict[str, Any]:
    handle = _admin(request, tenant)
    info = await handle.learn()
    return {"tenant": tenant, "version": None if info is None else _version(info), "aliases": handle.aliases()}
