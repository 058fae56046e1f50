"""The scheduling policy: which waiting tenant a resource serves next. Pure: no asyncio, no ML.

One ``Scheduler`` serves every resource of a runtime, by name: ``"decode"`` (the engine's LoRA
slots, clora.sampler.actor) and ``"train"`` (the trainer's device, clora.trainer.step_queue). For
each resource a tenant is *idle*, *waiting* (it asked, nothing granted yet) or *running* (granted,
not yet charged). The rule, applied at every decision (``pick``):

1. **Aging** (no starvation): a waiter that has waited ``aging_s`` or longer is served first,
   whatever its class (the longest such waiter first). So a background tenant always progresses.
2. **Strict priority** between classes: only waiters of the highest ``priority`` present compete.
3. **Weighted fair queuing** within a class, by device-seconds: each tenant has a virtual time per
   resource, ``seconds used / weight``; the waiter with the smallest virtual time goes first (ties:
   the earliest waiter, then the name). A tenant that comes back after being idle starts at the
   class's current virtual time (never below it), so idling banks no credit.

Every decision that chose among several waiters is an event (``scheduler.decision``, with the
queue: each waiter's class, weight, virtual time and wait); a waiter waiting longer than
``wait_bound_s`` gets one ``scheduler.wait_exceeded`` warning per wait. Events go to ``log`` (a
structlog logger; the runtime's, or the owning actor's; None: nowhere); time comes from ``clock``
(tests pass their own). Priority and weight changes take effect at the next decision.

**Yielding to a higher class** (``yield_to_higher``, docs/scheduling.md): a lower class's *new* work
also waits while a higher class is *active* (``yields_to``): "engine": engine requests, while it decodes;
"device": engine requests and train steps, while it decodes or trains; "never": off. Activity lingers
``linger_s``; a hold (``hold`` / ``unhold``: ``scheduler.yielded`` / ``scheduler.resumed``) ages like a wait.
Listeners (``subscribe``) hear of every change; ``next_yield_change`` says when an answer changes by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_args

from clora import events
from clora.config import YieldMode
from clora.errors import ConfigError

__all__ = ["DECODE", "PRIORITY_BACKGROUND", "PRIORITY_INTERACTIVE", "PRIORITY_NORMAL", "Scheduler", "TRAIN",
           "TenantPolicy", "YIELD_MODES"]

PRIORITY_INTERACTIVE = 1
PRIORITY_NORMAL = 0  # ExperimentConfig.priority's default
PRIORITY_BACKGROUND = -1

DECODE = "decode"  # the engine's LoRA slots (and the requests sent to the engine)
TRAIN = "train"  # the trainer's device
YIELD_MODES: tuple[str, ...] = get_args(YieldMode)  # SchedulerConfig.yield_to_higher
_WATCHED = {  # yield_to_higher -> resource a lower class's new work is for -> higher-class activity it waits for
    "device": {DECODE: (DECODE, TRAIN), TRAIN: (DECODE, TRAIN)},
    "engine": {DECODE: (DECODE,)},
    "never": {},
}


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """A tenant's class (higher runs first) and its share within the class."""

    priority: int = PRIORITY_NORMAL
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"a tenant's weight must be > 0, got {self.weight}")


@dataclass(slots=True)
class _Use:
    """One tenant on one resource."""

    vtime: float = 0.0  # device-seconds used / weight, lifted to the class's floor on return from idle
    seconds: float = 0.0  # device-seconds used, all told
    grants: int = 0
    waiting_since: float | None = None
    reported: bool = False  # this wait's scheduler.wait_exceeded was emitted
    running: int = 0  # grants not yet charged
    holds: int = 0  # new work held back, yielding to a higher class
    held_since: float | None = None  # when the current hold opened (its aging clock)
    hold_reported: bool = False  # this hold's scheduler.wait_exceeded was emitted
    active: bool = False  # waiting, running or holding now
    ended: float | None = None  # when its activity last ended (a higher class lingers linger_s after it)

    def busy(self) -> bool:
        return self.waiting_since is not None or self.running > 0 or self.holds > 0


@dataclass(slots=True)
class _Tenant:
    policy: TenantPolicy
    use: dict[str, _Use] = field(default_factory=dict)


class Scheduler:
    """Decides, per resource, which waiting tenant is served next (see the module docstring)."""

    def __init__(
        self,
        *,
        aging_s: float = 30.0,
        wait_bound_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
        yield_to_higher: str = "device",
        linger_s: float = 2.0,
    ) -> None:
        if yield_to_higher not in YIELD_MODES:
            raise ConfigError(f"yield_to_higher must be one of {', '.join(YIELD_MODES)}, got {yield_to_higher!r}")
        if linger_s < 0:
            raise ConfigError(f"linger_s must be >= 0, got {linger_s}")
        if not aging_s > 0:
            raise ConfigError(f"aging_s must be > 0 (the starvation bound), got {aging_s}")
        if wait_bound_s < 0:
            raise ConfigError(f"wait_bound_s must be >= 0 (0: no bound), got {wait_bound_s}")
        self.aging_s = aging_s
        self.wait_bound_s = wait_bound_s
        self.clock = clock
        self.log = log if log is not None else _Quiet()
        self._tenants: dict[str, _Tenant] = {}
        self._floor: dict[tuple[str, int], float] = {}  # (resource, class) -> the class's virtual time
        self.yield_to_higher = yield_to_higher
        self.linger_s = linger_s
        self._listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ tenants

    def set_policy(self, tenant: str, priority: int | None = None, weight: float | None = None) -> TenantPolicy:
        """Add ``tenant`` or change its class / weight (None keeps the current one); effective at the next
        decision. Returns the policy now in force."""
        known = self._tenants.get(tenant)
        old = known.policy if known else TenantPolicy()
        new = TenantPolicy(old.priority if priority is None else int(priority),
                           old.weight if weight is None else float(weight))
        if known is None:
            self._tenants[tenant] = _Tenant(new)
        elif new != old:
            for resource, use in known.use.items():  # join the new class at its current virtual time
                if use.waiting_since is not None or use.running:
                    use.vtime = max(use.vtime, self._class_floor(resource, new.priority, exclude=tenant))
            known.policy = new
            self.log.info(events.SCHEDULER_POLICY_CHANGED, tenant=tenant, priority=new.priority, weight=new.weight,
                       old_priority=old.priority, old_weight=old.weight)
            self._changed()
        return new

    def policy(self, tenant: str) -> TenantPolicy:
        known = self._tenants.get(tenant)
        return known.policy if known else TenantPolicy()

    def remove(self, tenant: str) -> None:
        """Forget ``tenant`` (its waits, holds and usage): nobody yields to it any more."""
        if self._tenants.pop(tenant, None) is not None:
            self._changed()

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._tenants

    # ------------------------------------------------------------------ one resource

    def _use(self, resource: str, tenant: str) -> _Use:
        known = self._tenants.get(tenant)
        if known is None:  # a tenant nobody declared (an actor used on its own): the default class
            known = self._tenants[tenant] = _Tenant(TenantPolicy())
        return known.use.setdefault(resource, _Use())

    def wait(self, resource: str, tenant: str) -> None:
        """``tenant`` asks for ``resource`` (no effect while it already waits)."""
        use = self._use(resource, tenant)
        if use.waiting_since is not None:
            return
        if not use.running:  # back from idle: no credit for the time away
            use.vtime = max(use.vtime, self._class_floor(resource, self.policy(tenant).priority, exclude=tenant))
        use.waiting_since = self.clock()
        use.reported = False
        self._settle(use)

    def cancel(self, resource: str, tenant: str) -> None:
        """``tenant`` stopped waiting for ``resource`` without being served."""
        known = self._tenants.get(tenant)
        use = known.use.get(resource) if known else None
        if use is not None and use.waiting_since is not None:
            use.waiting_since = None
            self._settle(use)

    def waiting(self, resource: str) -> list[str]:
        """The tenants waiting for ``resource``, in the order ``pick`` would serve them now."""
        return self._order(resource, self.clock())[0]

    def pick(self, resource: str, k: int = 1, among: Iterable[str] | None = None) -> list[str]:
        """Grant ``resource`` to up to ``k`` waiters (only those in ``among`` when given), best first;
        they stop waiting and run until ``charge``."""
        now = self.clock()
        order, reasons = self._order(resource, now)
        self.check_waits(resource, now)
        allowed = None if among is None else set(among)
        chosen = [t for t in order if allowed is None or t in allowed][:k]
        if len(order) > 1 and chosen:
            self.log.info(events.SCHEDULER_DECISION, resource=resource, chosen=chosen, reason=reasons[chosen[0]],
                       queue=[self._row(resource, t, now) for t in order])
        for tenant in chosen:
            use = self._use(resource, tenant)
            use.waiting_since = None
            use.running += 1
            use.grants += 1
            self._settle(use)
        return chosen

    def charge(self, resource: str, tenant: str, seconds: float) -> None:
        """``tenant``'s grant of ``resource`` ended after using it ``seconds``."""
        known = self._tenants.get(tenant)
        if known is None:
            return  # removed meanwhile
        use = self._use(resource, tenant)
        use.running = max(0, use.running - 1)
        use.seconds += max(0.0, seconds)
        use.vtime += max(0.0, seconds) / known.policy.weight
        self._settle(use)

    def check_waits(self, resource: str, now: float | None = None) -> list[str]:
        """Emit ``scheduler.wait_exceeded`` once per wait longer than ``wait_bound_s``; return those tenants."""
        if not self.wait_bound_s:
            return []
        now = self.clock() if now is None else now
        late = []
        for tenant, known in self._tenants.items():
            use = known.use.get(resource)
            if use is not None and use.waiting_since is None and use.held_since is not None \
                    and not use.hold_reported and now - use.held_since > self.wait_bound_s:
                use.hold_reported = True  # held back (yielding), not queued: reported as a wait all the same
                late.append(tenant)
                self.log.warning(events.SCHEDULER_WAIT_EXCEEDED, resource=resource, tenant=tenant,
                                 wait_s=round(now - use.held_since, 3), bound_s=self.wait_bound_s,
                                 priority=known.policy.priority, yields_to=self.yields_to(resource, tenant, now),
                                 queue=self._held_rows(resource, now))
                continue
            if use is None or use.waiting_since is None or use.reported:
                continue
            if now - use.waiting_since > self.wait_bound_s:
                use.reported = True
                late.append(tenant)
                self.log.warning(events.SCHEDULER_WAIT_EXCEEDED, resource=resource, tenant=tenant,
                           wait_s=round(now - use.waiting_since, 3), bound_s=self.wait_bound_s,
                           priority=known.policy.priority,
                           queue=[self._row(resource, t, now) for t in self._order(resource, now)[0]])
        return late

    def usage(self, resource: str) -> dict[str, float]:
        """Device-seconds each tenant used on ``resource``."""
        return {t: k.use[resource].seconds for t, k in self._tenants.items() if resource in k.use}

    def grants(self, resource: str) -> dict[str, int]:
        return {t: k.use[resource].grants for t, k in self._tenants.items() if resource in k.use}

    # ------------------------------------------------------------------ yielding to a higher class

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every change of waits, grants, holds or policies; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def yields_to(self, resource: str, tenant: str, now: float | None = None) -> list[str]:
        """The higher-class tenants ``tenant``'s new work on ``resource`` must wait for now ([]: it may go).
        An undeclared tenant never yields; a hold older than ``aging_s`` goes through."""
        watched = _WATCHED[self.yield_to_higher].get(resource, ())
        known = self._tenants.get(tenant)
        if not watched or known is None:
            return []
        now = self.clock() if now is None else now
        use = known.use.get(resource)
        if use is not None and use.held_since is not None and now - use.held_since >= self.aging_s:
            return []
        return sorted(t for t, k in self._tenants.items() if k.policy.priority > known.policy.priority
                      and any(r in k.use and self._active(k.use[r], now) for r in watched))

    def hold(self, resource: str, tenant: str) -> None:
        """One more piece of ``tenant``'s new work on ``resource`` is held back (``yields_to``); the first
        opens the hold: its aging clock starts, one ``scheduler.yielded`` event."""
        use = self._use(resource, tenant)
        use.holds += 1
        if use.holds == 1:
            now = self.clock()
            use.held_since, use.hold_reported = now, False
            self.log.info(events.SCHEDULER_YIELDED, resource=resource, tenant=tenant,
                          priority=self.policy(tenant).priority, mode=self.yield_to_higher,
                          to=[self._active_row(t, now) for t in self.yields_to(resource, tenant, now)],
                          queue=self._held_rows(resource, now))
        self._settle(use)

    def unhold(self, resource: str, tenant: str, *, went: bool = True) -> None:
        """One held piece of ``tenant``'s work goes on (``went``) or is given up; the last closes the hold
        (one ``scheduler.resumed``; the next hold's aging clock starts afresh)."""
        known = self._tenants.get(tenant)
        use = known.use.get(resource) if known else None
        if use is None or not use.holds:
            return
        use.holds -= 1
        if not use.holds:
            now = self.clock()
            held_s = now - use.held_since if use.held_since is not None else 0.0
            self.log.info(events.SCHEDULER_RESUMED, resource=resource, tenant=tenant, held_s=round(held_s, 3),
                          reason="cancelled" if not went else "aged" if held_s >= self.aging_s else "clear")
            use.held_since = None
        self._settle(use)

    def held(self, resource: str, tenant: str) -> bool:
        """``tenant`` has work on ``resource`` held back now (an open hold)."""
        known = self._tenants.get(tenant)
        return known is not None and resource in known.use and known.use[resource].holds > 0

    def next_yield_change(self, now: float | None = None) -> float | None:
        """The earliest clock time after ``now`` at which ``yields_to`` may answer differently (or a hold
        passes ``wait_bound_s``) with no call in between: a linger ends, a hold ages. None: no such time."""
        now = self.clock() if now is None else now
        times = []
        for known in self._tenants.values():
            for use in known.use.values():
                if not use.active and use.ended is not None:
                    times.append(use.ended + self.linger_s)
                if use.held_since is not None:
                    times.append(use.held_since + self.aging_s)
                    if self.wait_bound_s and not use.hold_reported and use.waiting_since is None:
                        times.append(use.held_since + self.wait_bound_s)
                    elif self.wait_bound_s and not use.reported and use.waiting_since is not None:
                        times.append(use.waiting_since + self.wait_bound_s)
        return min((t for t in times if t > now), default=None)

    def _active(self, use: _Use, now: float) -> bool:
        return use.active or (use.ended is not None and now - use.ended < self.linger_s)

    def _settle(self, use: _Use) -> None:
        """Record the end of ``use``'s activity (its linger starts) and tell the listeners of the change."""
        busy = use.busy()
        if use.active and not busy:
            use.ended = self.clock()
        use.active = busy
        self._changed()

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _active_row(self, tenant: str, now: float) -> dict[str, Any]:
        uses = self._tenants[tenant].use.items()
        return {"tenant": tenant, "priority": self.policy(tenant).priority, "active": sorted(r for r, u in uses if u.active),
                "lingering": sorted(r for r, u in uses if not u.active and self._active(u, now))}

    def _held_rows(self, resource: str, now: float) -> list[dict[str, Any]]:
        """Every tenant held back on ``resource`` now, longest first."""
        held = sorted((k.use[resource].held_since, t) for t, k in self._tenants.items()
                      if resource in k.use and k.use[resource].held_since is not None)
        return [{"tenant": t, "priority": self.policy(t).priority, "held_s": round(now - since, 3)} for since, t in held]

    # ------------------------------------------------------------------ internals

    def _order(self, resource: str, now: float) -> tuple[list[str], dict[str, str]]:
        """Waiters in service order, and why each is where it is (aged / priority / fair_share)."""
        waiters = [(t, k) for t, k in self._tenants.items()
                   if resource in k.use and k.use[resource].waiting_since is not None]
        aged = sorted((k.use[resource].waiting_since, t) for t, k in waiters
                      if now - k.use[resource].waiting_since >= self.aging_s)
        order = [t for _, t in aged]
        reasons = dict.fromkeys(order, "aged")
        rest = [(t, k) for t, k in waiters if t not in reasons]
        top = max((k.policy.priority for _, k in rest), default=None)
        rest.sort(key=lambda tk: (-tk[1].policy.priority, tk[1].use[resource].vtime,
                                  tk[1].use[resource].waiting_since, tk[0]))
        for tenant, known in rest:
            order.append(tenant)
            reasons[tenant] = "fair_share" if known.policy.priority == top else "priority"
        if len(rest) > 1 and reasons[rest[0][0]] == "fair_share" and rest[1][1].policy.priority != top:
            reasons[rest[0][0]] = "priority"  # it won on its class alone
        return order, reasons

    def _class_floor(self, resource: str, priority: int, *, exclude: str) -> float:
        """The class's virtual time now: the least of its active tenants' (or the last one seen)."""
        active = [k.use[resource].vtime for t, k in self._tenants.items()
                  if t != exclude and k.policy.priority == priority and resource in k.use
                  and (k.use[resource].waiting_since is not None or k.use[resource].running)]
        key = (resource, priority)
        if active:
            self._floor[key] = max(self._floor.get(key, 0.0), min(active))
        return self._floor.get(key, 0.0)

    def _row(self, resource: str, tenant: str, now: float) -> dict[str, Any]:
        known = self._tenants[tenant]
        use = known.use[resource]
        return {"tenant": tenant, "priority": known.policy.priority, "weight": known.policy.weight,
                "vtime": round(use.vtime, 4),
                "wait_s": round(now - use.waiting_since, 3) if use.waiting_since is not None else None}


class _Quiet:
    """The log of a scheduler nobody listens to."""

    def info(self, event: str, **fields: Any) -> None:
        pass

    warning = info
