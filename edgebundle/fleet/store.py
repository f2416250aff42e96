"""The fleet's Redis storage: every read and write of the controller's documents.

Owns the round trips (batched reads of a whole fleet: MGET in chunks plus one pipelined
HMGET per device), the parsing memo of a long-running controller, and the calls of the
fleet's Redis functions (:data:`edgebundle.sync.lua.FLEET_FUNCTIONS`): the lease, the
compare-and-set of the RolloutState and of each device's DesiredState. Decides nothing:
:mod:`edgebundle.fleet.rules` does, from what this module read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from edgebundle import keys
from edgebundle.errors import StateError, UsageError
from edgebundle.fleet.documents import (
    DEFAULT_RETRIES,
    ActualState,
    DesiredState,
    DeviceView,
    Move,
    Revision,
    RolloutState,
    dumps,
    loads,
    read_document,
)
from edgebundle.keys import check_id
from edgebundle.sync import lua
from edgebundle.sync.client import Client

LEASE_MS = 15_000  # the controller's lease; renewed every pass
READ_CHUNK = 1000  # keys per MGET when reading the fleet
CLUSTER_CONCURRENCY = 200  # function calls in flight at once on a Redis Cluster

ParseMemo = dict[tuple[str, str], tuple[str, Any]]  # (kind, device) -> (raw JSON, parsed)


async def _get_many(redis: Client, names: Sequence[str]) -> list[str | None]:
    """Values of many string keys in few round trips (MGET chunks; per-key GETs on a cluster,
    where the client's pipeline batches them per node)."""
    if not names:
        return []
    pipe = redis.pipeline(transaction=False)
    if isinstance(redis, RedisCluster):
        for name in names:
            pipe.get(name)
        return list(await pipe.execute())
    for start in range(0, len(names), READ_CHUNK):
        pipe.mget(list(names[start:start + READ_CHUNK]))
    values: list[str | None] = []
    for chunk in await pipe.execute():
        values.extend(chunk)
    return values


async def read_devices(redis: Client, fleet: str, *, labels: bool = True,
                       memo: ParseMemo | None = None
                       ) -> tuple[list[DeviceView], dict[str, str]]:
    """Every device of the fleet, sorted by id, in a handful of round trips
    (``labels=False``: without their labels, when no group selects devices); and the
    members of the fleet's set that are ignored, with why.

    A member is a device of this fleet when its id is valid and its agent registered
    it for this fleet (its info hash says so). Ignored, so that one bad member cannot
    stop, stall or hijack a rollout: an invalid id (``bad}id`` names no keys), an id
    whose device never registered (a ghost: it would be waited for forever), and a
    device registered for another fleet (it must not get this fleet's revision). The
    set itself is written by ``fleet provision`` (devices may not write it).

    ``memo`` (kept by a long-running controller) skips re-parsing documents whose JSON
    did not change since the last pass: most of them, most of the time.
    """
    ignored: dict[str, str] = {}
    ids = []
    for member in sorted(str(device) for device in
                         await redis.smembers(keys.fleet_devices(fleet))):
        try:
            ids.append(check_id("device", member))
        except UsageError:
            ignored[member] = "not a valid device id"
    pipe = redis.pipeline(transaction=False)
    for device in ids:
        pipe.hmget(keys.device_info(device), ["fleet", "labels"] if labels else ["fleet"])
    info, desired_raw, actual_raw, heartbeat_raw = await asyncio.gather(
        pipe.execute(),
        _get_many(redis, [keys.desired(device) for device in ids]),
        _get_many(redis, [keys.actual(device) for device in ids]),
        _get_many(redis, [keys.heartbeat(device) for device in ids]),
    )
    memo = {} if memo is None else memo
    fresh: ParseMemo = {}

    def parsed(kind: str, device: str, raw: str | None,
               parse: Callable[[str, str], Any]) -> Any:
        if raw is None:
            return None
        known = memo.get((kind, device))
        value = known[1] if known is not None and known[0] == raw else parse(raw, device)
        fresh[(kind, device)] = (raw, value)
        return value

    views = []
    for index, device in enumerate(ids):
        registered = info[index][0]
        if registered != fleet:
            ignored[device] = ("never registered: no agent has run as this device"
                               if registered is None else f"registered for fleet {registered}")
            continue
        view = DeviceView(id=device, labels={}, desired=None, actual=None,
                          online=heartbeat_raw[index] is not None)
        try:
            if labels:
                view.labels = parsed("labels", device, info[index][1], _labels) or {}
            view.desired = parsed("desired", device, desired_raw[index], _desired)
            view.actual = parsed("actual", device, actual_raw[index], _actual)
        except StateError as exc:  # its Redis key is named: the device's own document
            view.unreadable = str(exc)
        views.append(view)
    memo.clear()
    memo.update(fresh)
    return views, ignored


def _desired(raw: str, device: str) -> DesiredState | None:
    return read_document(raw, keys.desired(device), DesiredState.from_json)


def _actual(raw: str, device: str) -> ActualState | None:
    return read_document(raw, keys.actual(device), ActualState.from_json)


def _labels(raw: str, device: str) -> dict[str, str]:
    value = loads(raw, f"{keys.device_info(device)} field labels")
    return {str(key): str(item) for key, item in (value or {}).items()}


class FleetStore:
    """One fleet's documents in Redis; ``token`` is the controller's lease token (None:
    writes without a lease, as the operator's commands do)."""

    def __init__(self, redis: Client, fleet: str, token: str | None = None,
                 lease_ms: int = LEASE_MS) -> None:
        self.redis = redis
        self.fleet = fleet
        self.token = token
        self.lease_ms = lease_ms
        self._functions = lua.Functions(redis)
        self._write_desired = lua.Function(self._functions, "write_desired")
        self._write_rollout = lua.Function(self._functions, "write_rollout")
        self._hold_lease = lua.Function(self._functions, "hold_lease")
        self._release_lease = lua.Function(self._functions, "release_lease")
        self.last_rollout_raw = ""  # the RolloutState JSON this store last wrote
        self._memo: ParseMemo = {}  # parsed device documents of the last read

    # lease

    async def hold_lease(self) -> bool:
        """Take or renew the lease; False when another controller holds it."""
        if self.token is None:
            raise UsageError("this controller has no lease token")
        held = await self._hold_lease(keys=[keys.controller_lock(self.fleet)],
                                      args=[self.token, self.lease_ms])
        return bool(int(held))

    async def release_lease(self) -> None:
        if self.token is not None:
            await self._release_lease(keys=[keys.controller_lock(self.fleet)], args=[self.token])

    # pause

    async def paused_at(self) -> str | None:
        """When the rollout was paused (the ``paused`` key), None when it is not."""
        value = await self.redis.get(keys.paused(self.fleet))
        return None if value is None else str(value)

    async def is_paused(self) -> bool:
        return bool(await self.redis.exists(keys.paused(self.fleet)))

    async def pause(self, now: float) -> bool:
        """Set the ``paused`` key; False if it was set already."""
        return bool(await self.redis.set(keys.paused(self.fleet), repr(now), nx=True))

    async def unpause(self) -> None:
        await self.redis.delete(keys.paused(self.fleet))

    # documents

    async def devices(self, *, labels: bool = True) -> tuple[list[DeviceView], dict[str, str]]:
        """:func:`read_devices`, with this store's parsing memo."""
        return await read_devices(self.redis, self.fleet, labels=labels, memo=self._memo)

    async def read_rollout(self) -> tuple[str, RolloutState | None]:
        key = keys.rollout(self.fleet)
        raw = await self.redis.get(key)
        return str(raw or ""), read_document(raw, key, RolloutState.from_json)

    async def write_rollout(self, expected: str, rollout: RolloutState, *,
                            revision: Revision | None = None, resume: bool = False) -> str:
        """Compare-and-set the RolloutState: 'ok' (then :attr:`last_rollout_raw` is what was
        written), 'changed' or 'lease'."""
        raw = dumps(rollout.to_json())
        reply = await self._write_rollout(
            keys=[keys.rollout(self.fleet), keys.controller_lock(self.fleet),
                  keys.revisions(self.fleet), keys.paused(self.fleet)],
            args=[expected, raw, self.token or "", revision.id if revision else "",
                  dumps(revision.to_json()) if revision else "", "resume" if resume else ""])
        if reply == "ok":
            self.last_rollout_raw = raw
        return str(reply)

    async def revisions(self, ids: Sequence[str | None]) -> dict[str, Revision]:
        wanted = sorted({rev for rev in ids if rev})
        if not wanted:
            return {}
        raws = await self.redis.hmget(keys.revisions(self.fleet), wanted)
        found = {}
        key = keys.revisions(self.fleet)
        for rev, raw in zip(wanted, raws, strict=True):
            revision = read_document(raw, f"{key} field {rev}", Revision.from_json)
            if revision is not None:
                found[rev] = revision
        return found

    async def write_desired(self, moves: Sequence[Move], now: float,
                            retries: int = DEFAULT_RETRIES) -> list[str]:
        """Give each device its revision (generation + 1, compare-and-set) and nudge it;
        the ids written (a device someone else wrote in between is left for next pass)."""
        if not moves:
            return []
        calls: list[tuple[list[str], list[str | int]]] = []
        for view, revision, spec in moves:
            generation = view.desired.generation if view.desired else 0
            document = DesiredState(generation=generation + 1, revision=revision.id, spec=spec,
                                    written_at=now, retries=retries)
            calls.append(([keys.desired(view.id)],
                          [generation, dumps(document.to_json()), keys.nudge(view.id)]))
        if isinstance(self.redis, RedisCluster):
            # concurrent calls, a chunk at a time (routed per key by the cluster client)
            results: list[Any] = []
            for start in range(0, len(calls), CLUSTER_CONCURRENCY):
                results.extend(await asyncio.gather(*(
                    self._write_desired(keys=call_keys, args=call_args)
                    for call_keys, call_args in calls[start:start + CLUSTER_CONCURRENCY])))
        else:
            await self._functions.ensure_loaded()  # a pipeline cannot load half-way
            pipe = self.redis.pipeline(transaction=False)
            for call_keys, call_args in calls:
                pipe.fcall(self._write_desired.name, len(call_keys), *call_keys, *call_args)
            results = await pipe.execute()
        return [view.id for (view, _, _), ok in zip(moves, results, strict=True) if int(ok) == 1]
