"""Every Redis key edgebundle uses, in one place: the sync core's (threads, runs, a
device's local replica) and the fleet's (devices, revisions, rollouts).

Sync. All keys of a thread carry the hash tag ``{<thread id>}``, so one Lua function can change
them atomically and Redis Cluster keeps them in one slot (no CROSSSLOT)::

    eb:{T}:meta              hash   epoch, version, floor, created_at, active_run, positions
    eb:{T}:msgs              hash   message id -> message JSON (tombstones included)
    eb:{T}:changes           zset   message id scored by the version of its last change
    eb:{T}:mids              hash   device id -> last applied mutation id (exactly-once push)
    eb:{T}:lock              string the inference lock: a random token, SET NX PX
    eb:{T}:fence             string fencing counter, INCR on every acquisition
    eb:{T}:queue             list   queued run ids, FIFO (RPUSH / LPOP)
    eb:{T}:runs              zset   run ids scored by creation order (for TTL refresh)
    eb:{T}:inputs            hash   input message id -> the run it started (idempotent turns)
    eb:{T}:run:<R>           hash   the run object (JSON), fence, last delta seq, reply position,
                                    the token of the holder that ended it
    eb:{T}:run:<R>:events    stream the run's events; ids double as resume cursors
    eb:{T}:run:<R>:text      string the run's text so far (APPEND per delta batch)
    eb:{T}:run:<R>:go        list   wake-up for a queued run (BLPOP; no sleep-polling)

A device's local store (offline-first replication, :mod:`edgebundle.sync.replication`)
also holds::

    eb:{T}:replica           hash   central epoch and version mirrored, the local version
                                    of the copy, next mutation id, the outbox being sent
    eb:replica:threads       set    threads this device has seen (they are mirrored)
    eb:replica:dirty         set    threads changed offline, not yet in the central store

Thread ids are validated so that they cannot break out of the hash tag.

Fleet. A device's keys carry the hash tag ``{dev:<id>}`` (docs/api.md), so a per-device ACL
user can be limited to ``eb:dev:{dev:<id>}:*`` and Redis Cluster keeps them in one
slot; the fleet's own keys carry ``{fleet:<name>}``::

    eb:dev:{dev:D}:info        hash    fleet, labels (JSON), agent version, registered_at
    eb:dev:{dev:D}:hb          string  heartbeat JSON, with a TTL (gone = offline)
    eb:dev:{dev:D}:desired     string  DesiredState JSON (controller writes, agent reads)
    eb:dev:{dev:D}:actual      string  ActualState JSON (agent writes, controller reads)
    eb:dev:{dev:D}:nudge       channel pub/sub nudge "desired changed" (only a hint: the
                                       agent also polls desired by its generation)
    eb:fleet:{fleet:F}:devices  set    device ids registered in fleet F (agents SADD)
    eb:fleet:{fleet:F}:revs     hash   revision id -> Revision JSON
    eb:fleet:{fleet:F}:rollout  string Rollout JSON (the controller's durable progress)
    eb:fleet:{fleet:F}:paused   string present = the rollout is paused (pause/resume)
    eb:fleet:{fleet:F}:lock     string the controller's lease (one controller at a time)

Ids are validated (check_id) so they cannot break out of a tag.
"""

from __future__ import annotations

import re

from edgebundle.errors import UsageError

PREFIX = "eb"
ID_CHARS = r"[A-Za-z0-9_.:-]{1,128}"  # a thread, run or device id (the OpenAPI pattern too)
_ID = re.compile(ID_CHARS)


def check_id(kind: str, value: str) -> str:
    """``value`` if it is a usable id (letters, digits, ``_.:-``, <= 128 chars), the
    whole of it: ``$`` would also match before a trailing newline (``kitchen\n`` would
    pass as a look-alike of ``kitchen``), so the match is ``fullmatch``."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise UsageError(
            f"invalid {kind} id {value!r}: use 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _tag(thread_id: str) -> str:
    return f"{PREFIX}:{{{check_id('thread', thread_id)}}}"


def meta(thread_id: str) -> str:
    return f"{_tag(thread_id)}:meta"


def messages(thread_id: str) -> str:
    return f"{_tag(thread_id)}:msgs"


def changes(thread_id: str) -> str:
    return f"{_tag(thread_id)}:changes"


def mutation_ids(thread_id: str) -> str:
    return f"{_tag(thread_id)}:mids"


def lock(thread_id: str) -> str:
    return f"{_tag(thread_id)}:lock"


def fence(thread_id: str) -> str:
    return f"{_tag(thread_id)}:fence"


def queue(thread_id: str) -> str:
    return f"{_tag(thread_id)}:queue"


def runs(thread_id: str) -> str:
    return f"{_tag(thread_id)}:runs"


def turn_inputs(thread_id: str) -> str:
    return f"{_tag(thread_id)}:inputs"


def replica(thread_id: str) -> str:
    return f"{_tag(thread_id)}:replica"


def replica_threads() -> str:
    return f"{PREFIX}:replica:threads"


def replica_dirty() -> str:
    return f"{PREFIX}:replica:dirty"


def run(thread_id: str, run_id: str) -> str:
    return f"{_tag(thread_id)}:run:{check_id('run', run_id)}"


def run_events(thread_id: str, run_id: str) -> str:
    return f"{run(thread_id, run_id)}:events"


def run_text(thread_id: str, run_id: str) -> str:
    return f"{run(thread_id, run_id)}:text"


def run_wakeup(thread_id: str, run_id: str) -> str:
    return f"{run(thread_id, run_id)}:go"


def fixed_keys(thread_id: str) -> list[str]:
    """The fixed keys of a thread, in the order the Lua functions see them as
    ``KEYS[1..9]`` (:func:`edgebundle.sync.lua.script_keys`: the order is the API)."""
    return [
        meta(thread_id),
        messages(thread_id),
        changes(thread_id),
        mutation_ids(thread_id),
        lock(thread_id),
        fence(thread_id),
        queue(thread_id),
        runs(thread_id),
        turn_inputs(thread_id),
    ]


def thread_keys(thread_id: str) -> list[str]:
    """The fixed keys that hold a thread's state: :func:`fixed_keys` but the lock (a
    lease that ends on its own). Run keys are found through :func:`runs`."""
    held = lock(thread_id)
    return [key for key in fixed_keys(thread_id) if key != held]


def run_keys(thread_id: str, run_id: str) -> list[str]:
    """One run's keys, in the order the Lua functions see them after the fixed ones."""
    return [
        run(thread_id, run_id),
        run_events(thread_id, run_id),
        run_wakeup(thread_id, run_id),
        run_text(thread_id, run_id),
    ]


# -- the fleet --------------------------------------------------------------------

def _dev(device_id: str) -> str:
    return f"{PREFIX}:dev:{{dev:{check_id('device', device_id)}}}"


def _fleet(name: str) -> str:
    return f"{PREFIX}:fleet:{{fleet:{check_id('fleet', name)}}}"


def device_prefix(device_id: str) -> str:
    """The prefix of every key of one device (for its ACL user's key pattern)."""
    return f"{_dev(device_id)}:"


def device_info(device_id: str) -> str:
    return f"{_dev(device_id)}:info"


def heartbeat(device_id: str) -> str:
    return f"{_dev(device_id)}:hb"


def desired(device_id: str) -> str:
    return f"{_dev(device_id)}:desired"


def actual(device_id: str) -> str:
    return f"{_dev(device_id)}:actual"


def nudge(device_id: str) -> str:
    return f"{_dev(device_id)}:nudge"


def fleet_prefix(name: str) -> str:
    return f"{_fleet(name)}:"


def fleet_devices(name: str) -> str:
    return f"{_fleet(name)}:devices"


def revisions(name: str) -> str:
    return f"{_fleet(name)}:revs"


def rollout(name: str) -> str:
    return f"{_fleet(name)}:rollout"


def paused(name: str) -> str:
    return f"{_fleet(name)}:paused"


def controller_lock(name: str) -> str:
    return f"{_fleet(name)}:lock"
