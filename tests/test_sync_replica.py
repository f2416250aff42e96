"""The device replica (edgebundle.sync.replica), fed hand-made sync objects and events.

No Redis here: these pin down the merge rules on their own. The concurrency test
(tests/test_sync_concurrency.py) feeds replicas what a real Redis answers.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from edgebundle.errors import EpochMismatchError, UsageError
from edgebundle.sync.models import Run, SyncState, ThreadMessage
from edgebundle.sync.replica import Replica

T = "thread-r1"


def msg(id_: str, version: int, content: str = "", **kw: Any) -> ThreadMessage:
    fields: dict[str, Any] = {"role": "user", "position": float(version)}
    fields.update(kw)
    return ThreadMessage(id=id_, content=content or f"{id_}@{version}", version=version, **fields)


def state(version: int, *messages: ThreadMessage, full: bool = False, epoch: str = "e1",
          active: Run | None = None, queued: tuple[Run, ...] = ()) -> SyncState:
    return SyncState(id=T, epoch=epoch, version=version, full=full, messages=messages,
                     active_run=active, queued_runs=queued)


def contents(replica: Replica) -> list[str]:
    return [m.content for m in replica.messages()]


def test_full_sync_replaces_everything_and_sets_the_cursor() -> None:
    replica = Replica(T)
    assert (replica.epoch, replica.version) == (None, 0)
    replica.apply_sync(state(3, msg("a", 1), msg("b", 3), full=True))
    assert replica.cursor == ("e1", 3)
    replica.apply_sync(state(7, msg("c", 7), full=True, epoch="e2"))
    assert replica.cursor == ("e2", 7)
    assert [m.id for m in replica.messages()] == ["c"]


def test_diff_merges_by_version_and_the_higher_version_wins() -> None:
    replica = Replica(T)
    replica.apply_sync(state(2, msg("a", 1), msg("b", 2), full=True))
    # b is stale (1 < 2): ignored; a was edited at 4; c is new.
    replica.apply_sync(state(5, msg("a", 4, "edited"), msg("b", 1, "old"), msg("c", 5)))
    assert replica.message("a") == msg("a", 4, "edited")
    assert replica.message("b") == msg("b", 2)
    assert replica.cursor == ("e1", 5)
    # A late answer to an older request merges but never moves the cursor back.
    replica.apply_sync(state(3, msg("a", 3, "older edit")))
    assert replica.cursor == ("e1", 5)
    assert replica.message("a") == msg("a", 4, "edited")


def test_tombstones_hide_messages_and_order_is_by_position() -> None:
    replica = Replica(T)
    replica.apply_sync(state(3, msg("x", 1, position=2.0), msg("y", 2, position=1.0),
                             msg("z", 3, position=3.0), full=True))
    assert [m.id for m in replica.messages()] == ["y", "x", "z"]
    replica.apply_sync(state(4, msg("x", 4, "", position=2.0, deleted=True)))
    assert [m.id for m in replica.messages()] == ["y", "z"]
    tombstone = replica.message("x")
    assert tombstone is not None and tombstone.deleted
    assert "x" not in [m["id"] for m in replica.snapshot()["messages"]]


def test_a_diff_from_another_epoch_is_refused() -> None:
    replica = Replica(T)
    replica.apply_sync(state(2, msg("a", 1), full=True))
    with pytest.raises(EpochMismatchError):
        replica.apply_sync(state(3, msg("b", 3), epoch="other"))
    assert replica.cursor == ("e1", 2)
    assert [m.id for m in replica.messages()] == ["a"]


def test_a_sync_object_of_another_thread_is_a_usage_error() -> None:
    replica = Replica("other-thread")
    with pytest.raises(UsageError, match="one replica per thread"):
        replica.apply_sync(state(1, full=True))


def test_events_stream_text_once_and_never_move_the_cursor() -> None:
    replica = Replica(T)
    replica.apply_sync(state(2, msg("u1", 2), full=True))
    assistant = msg("a1", 3, "", role="assistant", status="in_progress", run_id="r1")
    assistant = ThreadMessage.from_json({**assistant.to_json(), "content": ""})
    replica.apply_event("message.created", {"message": assistant.to_json()})
    for seq, text in [(1, "Hel"), (2, "lo"), (2, "lo"), (1, "Hel"), (3, " world")]:
        replica.apply_event("message.delta", {"message_id": "a1", "seq": seq, "text": text})
    shown = replica.message("a1")
    assert shown is not None and shown.content == "Hello world"
    assert replica.cursor == ("e1", 2)  # events carry version 3, the cursor stays
    # The same in-progress copy again (a diff at equal version) keeps the streamed text.
    replica.apply_sync(state(3, assistant))
    assert contents(replica)[-1] == "Hello world"
    final = msg("a1", 4, "Hello world!", role="assistant", run_id="r1")
    replica.apply_event("message.completed", {"message": final.to_json()})
    replica.apply_event("message.delta", {"message_id": "a1", "seq": 4, "text": "late"})
    assert replica.message("a1") == final
    assert replica.cursor == ("e1", 3)


def test_a_replayed_stream_read_twice_gives_the_same_text() -> None:
    """Two readers (or a resumed one) applying overlapping event ranges agree."""
    created = ThreadMessage(id="a", role="assistant", content="", status="in_progress",
                      version=5, position=5.0)
    texts = [f"t{i} " for i in range(20)]
    deltas = [{"message_id": "a", "seq": i + 1, "text": t} for i, t in enumerate(texts)]
    once, twice = Replica(T), Replica(T)
    for replica in (once, twice):
        replica.apply_sync(state(4, full=True))
        replica.apply_event("message.created", {"message": created.to_json()})
    for d in deltas:
        once.apply_event("message.delta", d)
    for d in deltas[:12] + deltas[5:]:  # resumed from an older event id
        twice.apply_event("message.delta", d)
    assert once.snapshot() == twice.snapshot()
    assert contents(once) == ["".join(texts)]


def test_run_events_update_the_runs_map_and_a_stale_sync_does_not_revive_a_run() -> None:
    replica = Replica(T)
    replica.apply_sync(state(1, full=True))
    r1 = Run(id="r1", thread_id=T, status="queued")
    r2 = Run(id="r2", thread_id=T, status="queued")
    replica.apply_event("run.queued", {"run": r1.to_json()})
    replica.apply_event("run.queued", {"run": r2.to_json()})
    assert [r.id for r in replica.queued_runs] == ["r1", "r2"]
    started = Run(id="r1", thread_id=T, status="in_progress", fence=1)
    replica.apply_event("run.started", {"run": started.to_json()})
    assert replica.active_run == started
    assert [r.id for r in replica.queued_runs] == ["r2"]
    done = Run(id="r1", thread_id=T, status="completed", reason="eos", fence=1)
    replica.apply_event("run.completed", {"run": done.to_json(), "reason": "eos",
                                          "usage": {}})
    assert replica.active_run is None
    assert replica.runs()["r1"] == done
    # A sync answered before the run ended still names r1 active: it stays ended.
    replica.apply_sync(state(2, active=started, queued=(r2,)))
    assert replica.active_run is None
    assert replica.runs()["r1"] == done
    assert [r.id for r in replica.queued_runs] == ["r2"]
    replica.apply_event("done", {})  # no-op
    replica.apply_event("some.future.event", {"x": 1})  # ignored
    assert replica.runs()["r1"] == done


def test_a_sync_event_carries_a_sync_object_as_json() -> None:
    replica = Replica(T)
    replica.apply_event("sync", state(4, msg("a", 4), full=True).to_json())
    assert replica.cursor == ("e1", 4)
    assert contents(replica) == ["a@4"]


def test_mutations_get_increasing_mids_until_acknowledged() -> None:
    replica = Replica(T)
    put = replica.put_mutation({"id": "m1", "role": "user", "content": "hi"})
    delete = replica.delete_mutation("m0")
    assert (put["mid"], put["op"], delete["mid"], delete["op"]) == (1, "put", 2, "delete")
    assert replica.pending == [put, delete]
    assert replica.messages() == []  # only what the server answers changes the copy
    replica.acknowledge(1)
    assert replica.pending == [delete]
    assert replica.put_mutation({"id": "m2", "content": "x"})["mid"] == 3
    with pytest.raises(UsageError):
        replica.put_mutation({"content": "no id"})


def test_any_grouping_of_diffs_converges_to_the_full_state() -> None:
    """A server history of random puts/edits/deletes, read by three devices that sync
    at different moments (every change, now and then, only at the end): all equal
    the full state."""
    rng = random.Random(7)
    server: dict[str, ThreadMessage] = {}
    history: list[ThreadMessage] = []  # every change, in version order
    for version in range(1, 201):
        live = [m for m in server.values() if not m.deleted]
        roll = rng.random()
        if roll < 0.5 or not live:
            changed = msg(f"m{version}", version, position=float(version))
        elif roll < 0.8:
            old = rng.choice(live)
            changed = ThreadMessage.from_json({**old.to_json(), "version": version,
                                         "content": f"edit@{version}"})
        else:
            old = rng.choice(live)
            changed = ThreadMessage.from_json({**old.to_json(), "version": version,
                                         "content": "", "deleted": True})
        server[changed.id] = changed
        history.append(changed)

    def diff(since: int, upto: int) -> SyncState:
        # Like the server: each changed message once, at its latest version <= upto.
        latest = {m.id: m for m in history[:upto] if m.version > since}
        return state(upto, *latest.values())

    every, sometimes, late = Replica(T), Replica(T), Replica(T)
    for replica in (every, sometimes, late):
        replica.apply_sync(state(0, full=True))
    for version in range(1, 201):
        every.apply_sync(diff(every.version, version))
        if rng.random() < 0.1:
            sometimes.apply_sync(diff(sometimes.version, version))
    for replica in (sometimes, late):
        replica.apply_sync(diff(replica.version, 200))
    full = Replica(T)
    full.apply_sync(state(200, *[m for m in server.values() if not m.deleted], full=True))
    assert every.snapshot() == sometimes.snapshot() == late.snapshot() == full.snapshot()
    assert len(full.messages()) > 20
