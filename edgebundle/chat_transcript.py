"""What the terminal chat has shown of one thread, and the run events that add to it.

What is printed is what the :class:`~edgebundle.sync.replica.Replica` holds: every
event goes to the replica first, and only the part of a message's text beyond what
was already printed is written. The replica drops replayed deltas by
``(message_id, seq)``, so a rejoined stream (after a dropped connection, resumed
with ``Last-Event-ID``) never prints text twice. Messages of runs made on other
devices are marked with the device id of the run (``[devB] assistant: …``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgebundle.sse import Event
from edgebundle.sync.models import Run, ThreadMessage
from edgebundle.sync.replica import Replica

if TYPE_CHECKING:
    from edgebundle.terminal_chat import Console


@dataclass
class Reply:
    """A run being shown: where its events got to, and what Ctrl-C did to it."""

    run_id: str | None
    own: bool
    last_event_id: str | None = None
    message_id: str | None = None
    frozen: bool = False  # Ctrl-C: show nothing more of it but its final copy
    done: bool = False
    task: asyncio.Task[Any] | None = None
    cancelling: asyncio.Task[None] | None = field(default=None, repr=False)


class Transcript:
    """One thread on the console: which message shows how much of its text."""

    def __init__(self, console: Console, device_id: str, thread: Replica) -> None:
        self.console = console
        self.device_id = device_id
        self.thread = thread
        self.printed: dict[str, str] = {}  # message id -> the text of it shown so far
        self.finished: set[str] = set()  # messages shown to their end
        self.my_runs: set[str] = set()
        self.followed: set[str] = set()  # runs shown live (or being shown)

    def typed(self, message_id: str, content: str) -> None:
        """A line the user typed: it is on screen already."""
        self.printed[message_id] = content
        self.finished.add(message_id)

    def seen(self, reply: Reply) -> str | None:
        """The text of the reply's message printed so far (None: none of it arrived)."""
        return None if reply.message_id is None else self.printed.get(reply.message_id, "")

    def _run_of(self, message: ThreadMessage) -> Run | None:
        runs = self.thread.runs()
        if message.run_id is not None:
            return runs.get(message.run_id)
        return next((r for r in runs.values() if r.input_message_id == message.id), None)

    def _label(self, message: ThreadMessage) -> str:
        run = self._run_of(message)
        mine = run is not None and (run.id in self.my_runs or run.device_id == self.device_id)
        if mine:
            return f"{message.role}: "
        device = run.device_id if run is not None and run.device_id else "elsewhere"
        return f"[{device}] {message.role}: "

    def show(self, message: ThreadMessage, label: str | None = None) -> None:
        """Print what of ``message`` was not printed yet; end its line when it is final."""
        if message.id in self.finished or message.deleted:
            return
        printed = self.printed.get(message.id)
        if printed is None:
            self.console.end_line()
            self.console.write(label if label is not None else self._label(message))
            printed = ""
        if message.content.startswith(printed):
            self.console.write(message.content[len(printed):])
        else:  # changed elsewhere (stopped at another point, edited): say so, once
            self.console.end_line()
            self.console.note(f"the {message.role} message above is stored as: "
                              f"{message.content!r}")
        self.printed[message.id] = message.content
        if message.status != "in_progress":
            self.console.end_line()
            self.finished.add(message.id)

    def show_settled(self) -> None:
        """Every message not on screen yet but a live reply (shown by following its run)."""
        for message in self.thread.messages():
            if message.status == "in_progress" and message.role == "assistant":
                continue  # shown live by following its run (or when it is final)
            self.show(message)

    def on_event(self, event: Event, reply: Reply) -> None:
        """Show what one run event (already in the replica) changed."""
        data = event.data
        if event.type.startswith("run."):
            run = Run.from_json(data["run"])
            if reply.run_id is None:
                reply.run_id = run.id
            if reply.own:
                self.my_runs.add(run.id)
            self.followed.add(run.id)
            if event.type in ("run.failed", "run.cancelled"):
                self._ended(run, event, reply)
            return
        message_id = data.get("message_id") or data.get("message", {}).get("id")
        message = None if message_id is None else self.thread.message(str(message_id))
        if message is None:
            return
        if message.role == "assistant" and message.run_id == reply.run_id:
            reply.message_id = message.id
            if reply.frozen and event.type != "message.completed":
                return  # Ctrl-C: its final copy (= what was printed) still comes
        self.show(message)

    def _ended(self, run: Run, event: Event, reply: Reply) -> None:
        if event.type == "run.failed":
            self.console.end_line()
            self.console.note(f"the reply failed: {event.data.get('error') or 'no reason given'}")
        elif not reply.frozen:  # stopped from elsewhere (our own Ctrl-C needs no word)
            self.console.end_line()
            cause = "interrupted by an edit" if run.reason == "interrupted" else "stopped"
            self.console.note(f"the reply was {cause} on another device")
