"""The rollout controller's run loop: one pass at a time over a fleet, under a lease.

Owns :class:`Controller` (one pass: read with :mod:`edgebundle.fleet.store`, decide with
:mod:`edgebundle.fleet.rules`, write what was decided) and :func:`run_controller`
(passes in a loop). Everything it knows lives in Redis, so a controller that restarts,
or another one that takes over the lease, continues where the last one stopped.

:func:`run_controller` ticks while holding the lease ``controller_lock`` (``SET NX PX``,
renewed each pass), so two controllers never act at once: every RolloutState write checks
the lease in the same Redis function, and every DesiredState write is a compare-and-set
on the generation the controller read. A pause (the ``paused`` key) makes a tick do
nothing. The operator's commands are in :mod:`edgebundle.fleet.operator`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from redis.exceptions import RedisError as _RedisPyError

from edgebundle.errors import EdgebundleError
from edgebundle.fleet import rules, selection
from edgebundle.fleet.documents import DeviceView, RolloutState
from edgebundle.fleet.rules import Step
from edgebundle.fleet.store import LEASE_MS, FleetStore
from edgebundle.sync.client import Client

log = logging.getLogger(__name__)

TICK_INTERVAL = 2.0  # s between passes of run_controller


@dataclass
class TickSummary:
    fleet: str
    acted: bool  # False: no rollout, paused, or another controller holds the lease
    status: str | None = None  # the rollout's status after this pass
    phase: int | None = None
    moved: list[str] = field(default_factory=list)  # got the target revision this pass
    rolled_back: list[str] = field(default_factory=list)  # got the previous revision
    pinned: list[str] = field(default_factory=list)  # got their pinned revision
    counts: dict[str, int] = field(default_factory=dict)  # devices per state
    message: str = ""
    ignored: dict[str, str] = field(default_factory=dict)  # set members left out, and why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Controller:
    """One fleet's controller; ``token`` is its lease token (None: acts without a lease,
    as the operator's commands do)."""

    def __init__(self, redis: Client, fleet: str, token: str | None = None,
                 lease_ms: int = LEASE_MS) -> None:
        self.redis = redis
        self.fleet = fleet
        self.store = FleetStore(redis, fleet, token=token, lease_ms=lease_ms)

    async def tick(self, now: float | None = None) -> TickSummary:
        """One pass over the fleet: decide (:func:`rules.decide`) and write."""
        now = time.time() if now is None else now
        store = self.store
        summary = TickSummary(fleet=self.fleet, acted=False)
        if store.token is not None and not await store.hold_lease():
            summary.message = "another controller holds the lease"
            return summary
        raw, rollout = await store.read_rollout()
        if rollout is None:
            summary.message = "no rollout: run `edgebundle fleet apply MANIFEST`"
            return summary
        summary.status, summary.phase = rollout.status, rollout.phase
        if await store.is_paused():
            summary.message = "paused: `edgebundle fleet resume` continues"
            return summary
        views, summary.ignored = await store.devices(labels=rules.needs_labels(rollout))
        summary.acted = True
        if rollout.status in ("rolling_back", "rolled_back"):
            return await self.roll_back(raw, rollout, views, now, summary, rollout.message)
        if rollout.status not in ("progressing", "complete"):
            summary.message = rollout.message
            return summary
        return await self._progress(raw, rollout, views, now, summary)

    async def _progress(self, raw: str, rollout: RolloutState, views: list[DeviceView], now: float,
                        summary: TickSummary) -> TickSummary:
        revs = await self.store.revisions([rollout.revision, *(
            selection.pinned_revision(entry) for entry in rollout.pins.values())])
        decision = rules.decide(rollout, views, revs, now)
        for device, pin in decision.missing_pins.items():
            log.warning("device %s is pinned to %s, which this fleet never applied", device, pin)
        summary.counts = decision.counts
        summary.pinned = await self.store.write_desired(decision.pin_moves, now,
                                                        rules.retries(rollout))
        summary.moved = await self.store.write_desired(decision.moves, now,
                                                       rules.retries(rollout))
        step = decision.after(len(summary.moved))
        return await self._take(raw, decision.rollout, views, now, summary, step)

    async def _take(self, raw: str, rollout: RolloutState, views: list[DeviceView], now: float,
                    summary: TickSummary, step: Step) -> TickSummary:
        if step.rollback:
            return await self.roll_back(raw, rollout, views, now, summary, step.message)
        if step.store is not None:
            return await self._store(raw, step.store, summary)
        summary.message = step.message
        return summary

    async def _store(self, raw: str, updated: RolloutState, summary: TickSummary) -> TickSummary:
        reply = await self.store.write_rollout(raw, updated)
        if reply == "ok":
            summary.status, summary.phase, summary.message = (updated.status, updated.phase,
                                                              updated.message)
        else:
            summary.message = _not_written(reply)
        return summary

    async def roll_back(self, raw: str, rollout: RolloutState, views: list[DeviceView], now: float,
                        summary: TickSummary, message: str) -> TickSummary:
        """Every device whose desired state is the target goes back to the previous revision
        (new generation), all at once; 'rolling_back' is stored first so a controller that
        dies half-way is continued by the next one. ``raw`` is the stored RolloutState's JSON."""
        store = self.store
        if rollout.status != "rolling_back":
            started = replace(rollout, status="rolling_back", message=message)
            reply = await store.write_rollout(raw, started)
            if reply != "ok":
                summary.message = _not_written(reply)
                return summary
            raw, rollout = store.last_rollout_raw, started
        if not rollout.previous:
            return await self._store(raw, replace(rollout, status="frozen"), summary)
        revs = await store.revisions([rollout.previous])
        previous = revs.get(rollout.previous)
        if previous is None:
            summary.message = f"previous revision {rollout.previous} is missing from Redis"
            return summary
        moves = rules.rollback_moves(rollout, views, previous)
        summary.rolled_back = await store.write_desired(moves, now, rules.retries(rollout))
        if len(summary.rolled_back) < len(moves):  # someone wrote in between: next pass
            summary.status, summary.message = rollout.status, rollout.message
            return summary
        if rollout.status == "rolled_back":
            summary.status, summary.message = rollout.status, rollout.message
            return summary
        done = replace(rollout, status="rolled_back",
                       message=f"{rollout.message}; rolled back to {rollout.previous}")
        return await self._store(raw, done, summary)


def _not_written(reply: str) -> str:
    return ("lost the lease: nothing more written" if reply == "lease"
            else "the rollout changed meanwhile: the next pass decides again")


async def run_controller(redis: Client, fleet: str, *, interval: float = TICK_INTERVAL,
                         lease_ms: int = LEASE_MS, stop: asyncio.Event | None = None,
                         clock: Callable[[], float] = time.time,
                         on_tick: Callable[[TickSummary], None] | None = None) -> None:
    """Tick every ``interval`` s while holding the fleet's lease, until ``stop`` is set.

    Without the lease (another controller acts) it only tries to take it each pass.
    A pass that fails (Redis unreachable, a corrupt document) is logged and retried next pass.
    """
    controller = Controller(redis, fleet, token=secrets.token_hex(16), lease_ms=lease_ms)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            try:
                summary = await controller.tick(now=clock())
                if on_tick is not None:
                    on_tick(summary)
            except (_RedisPyError, OSError) as exc:
                log.warning("fleet %s: pass failed, retrying: %s", fleet, exc)
            except EdgebundleError as exc:  # e.g. a corrupt document: fixed by a new apply
                log.error("fleet %s: pass failed, retrying: %s", fleet, exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):  # not wait_for: edgebundle.tasks
                    await stop.wait()
    finally:
        with contextlib.suppress(_RedisPyError, OSError):
            await controller.store.release_lease()
