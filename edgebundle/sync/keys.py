"""Every Redis key edgebundle's sync uses, in one place.

All keys of a thread carry the hash tag ``{<thread id>}``, so one Lua function can change
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
