"""A device's local copy of one thread, built only from what the device received.

A replica is fed two things: sync objects (the answers of ``sync``, ``push`` and the
``sync`` that opens a run) and run events. It never looks at Redis. Its rules:

- A full sync object replaces everything; a diff is merged message by message, and
  the copy with the higher ``version`` wins (versions are the server's per-thread
  counter, so "higher" means "changed later").
- The cursor ``(epoch, version)`` moves only with sync objects. Events carry message
  versions too, but a device that skipped the diffs in between must not claim it has
  them: its next diff is asked from the cursor, and the merge rule makes seeing a
  message twice harmless.
- ``message.delta`` text is appended to the in-progress message locally, keyed by
  ``(message_id, seq)``: a replayed delta (resume from an older event id, two readers
  of one stream) is never applied twice. The streamed text shows only while the
  stored message is ``in_progress``; its final copy (``message.completed``, or a diff)
  replaces it.

The terminal chat keeps one of these per thread; the concurrency test keeps one per
simulated device and compares them with the server's full state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgebundle.errors import EpochMismatchError, UsageError
from edgebundle.keys import check_id
from edgebundle.sync.models import Run, SyncState, ThreadMessage

# Runs have no version; their status only moves forward, so a stale copy (an older
# sync object's active_run after run.completed arrived) is recognised by its rank.
_RUN_RANK = {"queued": 0, "in_progress": 1}


def _rank(run: Run) -> int:
    return _RUN_RANK.get(run.status, 2)  # 2: ended, whichever way


class Replica:
    """The local copy of thread ``thread_id``; see the module docstring for the rules."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = check_id("thread", thread_id)
        self.epoch: str | None = None
        self.version = 0
        self.active_run: Run | None = None
        self.queued_runs: tuple[Run, ...] = ()
        self._messages: dict[str, ThreadMessage] = {}
        self._runs: dict[str, Run] = {}
        # message id -> (last applied delta seq, streamed text so far)
        self._streamed: dict[str, tuple[int, str]] = {}
        self._next_mid = 1
        self._pending: list[dict[str, Any]] = []

    # -- what the device received ------------------------------------------------------

    @property
    def cursor(self) -> tuple[str | None, int]:
        """``(epoch, version)`` to ask the next diff from (``(None, 0)``: never synced)."""
        return self.epoch, self.version

    def apply_sync(self, state: SyncState) -> None:
        """Take a sync object: a full one replaces everything, a diff is merged."""
        if state.id != self.thread_id:
            raise UsageError(
                f"sync object of thread {state.id!r} given to the replica of "
                f"{self.thread_id!r}: keep one replica per thread"
            )
        if state.full:
            if state.epoch != self.epoch:
                # Another history: streamed text of the old one means nothing here.
                self._streamed.clear()
                self._runs.clear()
            self._messages = {m.id: m for m in state.messages}
            self.epoch, self.version = state.epoch, state.version
        else:
            if state.epoch != self.epoch:
                raise EpochMismatchError(
                    f"a diff of epoch {state.epoch!r} arrived for a replica at epoch "
                    f"{self.epoch!r}: ask for a full sync (epoch None)",
                    epoch=state.epoch,
                )
            for message in state.messages:
                self._merge(message)
            # A late answer to an older request must not move the cursor back.
            self.version = max(self.version, state.version)
        for run in (state.active_run, *state.queued_runs):
            if run is not None:
                self._merge_run(run)
        # Through the runs map, so a stale answer cannot revive a run an event ended.
        active = None if state.active_run is None else self._runs[state.active_run.id]
        self.active_run = active if active is not None and _rank(active) == 1 else None
        queued = (self._runs[r.id] for r in state.queued_runs)
        self.queued_runs = tuple(r for r in queued if _rank(r) == 0)

    def apply_event(self, type_: str, data: Mapping[str, Any]) -> None:
        """Take one run event (``type`` and decoded ``data`` of a RunEvent).

        Unknown types are ignored, so an older replica can follow a newer server.
        """
        if type_ in ("message.created", "message.completed"):
            self._merge(ThreadMessage.from_json(dict(data["message"])))
        elif type_ == "message.delta":
            self._delta(str(data["message_id"]), int(data["seq"]), str(data["text"]))
        elif type_.startswith("run."):
            self._run_event(Run.from_json(dict(data["run"])))
        elif type_ == "sync":
            self.apply_sync(SyncState.from_json(dict(data)))

    def _merge(self, message: ThreadMessage) -> None:
        current = self._messages.get(message.id)
        # Equal versions are the same change (streamed text is kept apart, in _streamed).
        if current is None or message.version > current.version:
            self._messages[message.id] = message
        if self._messages[message.id].status != "in_progress":
            self._streamed.pop(message.id, None)

    def _merge_run(self, run: Run) -> None:
        current = self._runs.get(run.id)
        if current is None or _rank(run) >= _rank(current):
            self._runs[run.id] = run

    def _run_event(self, run: Run) -> None:
        self._merge_run(run)
        run = self._runs[run.id]
        if _rank(run) == 0:
            ids = [r.id for r in self.queued_runs]
            kept = tuple(run if r.id == run.id else r for r in self.queued_runs)
            self.queued_runs = kept if run.id in ids else (*kept, run)
            return
        self.queued_runs = tuple(r for r in self.queued_runs if r.id != run.id)
        if _rank(run) == 1:
            self.active_run = run
        elif self.active_run is not None and self.active_run.id == run.id:
            self.active_run = None

    def _delta(self, message_id: str, seq: int, text: str) -> None:
        stored = self._messages.get(message_id)
        if stored is not None and stored.status != "in_progress":
            return  # the final copy is already here; late deltas add nothing
        last_seq, so_far = self._streamed.get(message_id, (0, ""))
        if seq <= last_seq:
            return  # replayed
        self._streamed[message_id] = (seq, so_far + text)

    # -- what the device shows -----------------------------------------------------------

    def messages(self) -> list[ThreadMessage]:
        """Visible messages in thread order (no tombstones), streamed text included."""
        visible = [self._shown(m) for m in self._messages.values() if not m.deleted]
        return sorted(visible, key=lambda m: (m.position, m.id))

    def message(self, message_id: str) -> ThreadMessage | None:
        """The copy of one message (tombstone included), or None if never received."""
        stored = self._messages.get(message_id)
        return None if stored is None else self._shown(stored)

    def _shown(self, message: ThreadMessage) -> ThreadMessage:
        streamed = self._streamed.get(message.id)
        if message.status != "in_progress" or streamed is None:
            return message
        # The stored in-progress copy may hold text the server saved so far; the
        # stream's text starts from the beginning, so the longer one is the newer.
        text = streamed[1] if len(streamed[1]) >= len(message.content) else message.content
        return ThreadMessage.from_json({**message.to_json(), "content": text})

    def runs(self) -> dict[str, Run]:
        """Every run this device heard of, by id, in its latest known state."""
        return dict(self._runs)

    def snapshot(self) -> dict[str, Any]:
        """A plain, comparable picture: epoch, version and the visible messages."""
        return {
            "id": self.thread_id,
            "epoch": self.epoch,
            "version": self.version,
            "messages": [m.to_json() for m in self.messages()],
            "active_run": None if self.active_run is None else self.active_run.id,
            "queued_runs": [r.id for r in self.queued_runs],
        }

    # -- what the device sends -----------------------------------------------------------

    def put_mutation(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """A push mutation that creates or edits ``message`` (needs ``id``), queued.

        The replica itself does not change: the push's answer (a diff that includes
        the change with its server version) is what updates it.
        """
        check_id("message", str(message.get("id", "")))
        return self._queue("put", dict(message))

    def delete_mutation(self, message_id: str) -> dict[str, Any]:
        """A push mutation that deletes ``message_id`` (a tombstone on the server), queued."""
        return self._queue("delete", {"id": check_id("message", message_id)})

    def _queue(self, op: str, message: dict[str, Any]) -> dict[str, Any]:
        mutation = {"mid": self._next_mid, "op": op, "message": message}
        self._next_mid += 1
        self._pending.append(mutation)
        return mutation

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Mutations not acknowledged yet, oldest first (send them again after a failure:
        the server applies each mid once)."""
        return list(self._pending)

    def acknowledge(self, up_to_mid: int) -> None:
        """Forget the pending mutations the server confirmed (mid <= ``up_to_mid``)."""
        self._pending = [m for m in self._pending if m["mid"] > up_to_mid]
