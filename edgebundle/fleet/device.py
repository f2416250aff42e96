"""The device side of the fleet's Redis protocol: what an agent writes and reads.

Owns the device's own keys (:mod:`edgebundle.keys`, tag ``{dev:<id>}``), so a
per-device ACL user is enough: ``register`` (its info hash, and the fleet's device set
only without a provisioned user), ``beat`` (the heartbeat with its TTL), ``report``
(the ActualState), ``read_desired`` (the DesiredState the controller wrote) and
:func:`watch_nudges` (the pub/sub hint that desired changed). Exported on their own so
tests of the controller can play many agents in-process with the agent's own code.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

from redis.exceptions import NoPermissionError

from edgebundle import __version__, keys
from edgebundle.fleet.acl import USER_PREFIX
from edgebundle.fleet.documents import (
    HEARTBEAT_TTL,
    ActualState,
    DesiredState,
    Heartbeat,
    dumps,
    read_document,
)
from edgebundle.sync.client import Client


async def report(redis: Client, device_id: str, state: ActualState) -> None:
    """Publish a device's actual state (what the controller reads)."""
    await redis.set(keys.actual(device_id), dumps(state.to_json()))


async def beat(redis: Client, device_id: str, heartbeat: Heartbeat,
               ttl: int = HEARTBEAT_TTL) -> None:
    """One heartbeat: the device counts as online while this key lives."""
    await redis.set(keys.heartbeat(device_id), dumps(heartbeat.to_json()), ex=ttl)


async def register(redis: Client, device_id: str, fleet: str, labels: Mapping[str, str]) -> None:
    """Announce the device to its fleet: its info hash (the fleet it runs for, labels).

    Membership of the fleet's device set is the admin's: ``fleet provision`` adds the
    device, and its Redis user (``dev:<id>``) may not write the set. Only under another
    user (a Redis without per-device users, where every device is trusted anyway) does
    the agent add itself, so such a fleet needs no setup.
    """
    await redis.hset(keys.device_info(device_id), mapping={
        "fleet": fleet, "labels": dumps(dict(labels)), "agent_version": __version__,
        "registered_at": str(time.time()),
    })
    try:
        user = str(await redis.execute_command("ACL", "WHOAMI"))
        if not user.startswith(USER_PREFIX):
            await redis.sadd(keys.fleet_devices(fleet), device_id)
    except NoPermissionError:
        pass  # a user the admin fenced some other way: membership is theirs


async def is_registered(redis: Client, device_id: str) -> bool:
    """Whether Redis still has the device's info hash (a restart may have lost it)."""
    return bool(await redis.exists(keys.device_info(device_id)))


async def read_desired(redis: Client, device_id: str) -> DesiredState | None:
    """The desired state the controller wrote (None: none yet); StateError naming its key
    if it is corrupt or of the wrong shape (its spec not a revision spec, say)."""
    key = keys.desired(device_id)
    return read_document(await redis.get(key), key, DesiredState.from_json)


async def watch_nudges(redis: Client, device_id: str, timeout: float,
                       on_nudge: Callable[[], None]) -> None:
    """Call ``on_nudge`` for every nudge until the subscription fails (then raise)."""
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(keys.nudge(device_id))
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is not None:
                on_nudge()
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


