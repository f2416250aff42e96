"""One terminal chat session on one thread: join, turns, following runs, watching.

It joins one thread (``POST /v1/threads``), prints its history, and then, while it
waits for the next line, watches the thread (``GET …/watch``) so that turns made on
other devices appear as they land: their user message, and their live reply by
following the run's events. A typed line starts a run (``POST …/runs``, streamed)
whose reply is printed as its ``message.delta`` events arrive. The turn is named by
its input id: a POST whose answer was lost is sent again as is, and the gateway
answers the retry with the run the turn started, so a turn never runs twice.

A gateway whose device keeps a local store (offline-first, see
:mod:`edgebundle.sync.replication`) says on ``/healthz`` whether it reaches the central
Redis; the session asks every few seconds and notes "offline, N pending" when the
device starts serving from its local store, and "back online" once its offline
changes are in the central store.

What is shown of the thread is :class:`~edgebundle.chat_transcript.Transcript`'s; the
HTTP of the gateway is :class:`~edgebundle.gateway_client.GatewayClient`'s; the
terminal itself (lines in, text out, SIGINT) is :mod:`edgebundle.terminal_chat`'s.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from edgebundle.chat_options import ChatOptions
from edgebundle.chat_transcript import Reply, Transcript
from edgebundle.errors import GatewayError
from edgebundle.gateway_client import (
    Dropped,
    EpochMoved,
    Events,
    GatewayClient,
    Gone,
    reason,
)
from edgebundle.sync.models import Run, SyncState
from edgebundle.sync.replica import Replica

if TYPE_CHECKING:
    from edgebundle.terminal_chat import Console

BACKOFF_FIRST = 0.2  # s, doubled per failed attempt up to BACKOFF_MAX, with jitter
BACKOFF_MAX = 5.0
LINK_POLL_INTERVAL = 3.0  # s between looks at the gateway's /healthz (its central link)


# -- retrying ---------------------------------------------------------------------


async def _backoff(attempt: int) -> None:
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 10))
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))


# -- the session ----------------------------------------------------------------------


class ChatSession:
    """One chat session on one thread; :meth:`run` until Ctrl-C/Ctrl-D at the prompt."""

    def __init__(self, options: ChatOptions, console: Console,
                 http: httpx.AsyncClient) -> None:
        self.options = options
        self.console = console
        self.gateway = GatewayClient(http, options.server)
        self.transcript: Transcript | None = None  # from the join on
        self._reply: Reply | None = None
        self._changed = asyncio.Event()
        self._quit = asyncio.Event()
        self._offline_noted = False  # the gateway itself does not answer
        self._device_offline = False  # the gateway answers from its local store
        self._joining: asyncio.Task[Any] | None = None

    # -- joining --------------------------------------------------------------------

    @property
    def shown(self) -> Transcript:
        assert self.transcript is not None, "join first"
        return self.transcript

    @property
    def thread(self) -> Replica:
        return self.shown.thread

    async def join(self) -> None:
        """Create or join the thread and print its history (one clear error if the
        gateway cannot be reached)."""
        self._joining = asyncio.current_task()
        try:
            await self._join()
        finally:
            self._joining = None

    async def _join(self) -> None:
        server = self.options.server
        state = await self.gateway.join(self.options.thread_id)
        self.transcript = Transcript(self.console, self.options.device_id, Replica(state.id))
        self.thread.apply_sync(state)
        self.console.write(f"thread {state.id} on {server} (this device: "
                           f"{self.options.device_id})\n")
        if self.options.thread_id is None:
            self.console.write(f"continue it on another device: edgebundle chat --server "
                               f"{server} --thread {state.id}\n")
        active = self.thread.active_run
        for message in self.thread.messages():
            if active is not None and message.run_id == active.id:
                continue  # shown live from its first event, below
            self.shown.show(message, f"{message.role}: ")
        if active is not None:
            await self._as_reply(self._follow_elsewhere(active))

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Read lines and show the thread until Ctrl-D, or Ctrl-C at the prompt."""
        watching = asyncio.create_task(self._watch())
        linking = asyncio.create_task(self._watch_link())
        line: asyncio.Task[str | None] | None = None
        quitting = asyncio.create_task(self._quit.wait())
        try:
            while True:
                await self._catch_up()
                self.console.prompt()
                line = line or asyncio.create_task(self.console.next_line())
                changed = asyncio.create_task(self._changed.wait())
                await asyncio.wait({line, changed, quitting},
                                   return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if quitting.done():
                    return
                if not line.done():
                    self._changed.clear()
                    continue
                text, line = line.result(), None
                if text is None:  # Ctrl-D
                    return
                self.console.typed()
                if text.strip():
                    await self._as_reply(self._turn(text))
        finally:
            self.console.end_line()
            for task in (watching, linking, quitting, line):
                if task is not None:
                    task.cancel()
            await asyncio.gather(watching, linking, quitting, return_exceptions=True)

    def interrupt(self) -> None:
        """Ctrl-C: stop the reply being shown, or end the chat at the prompt."""
        reply = self._reply
        if reply is None or reply.done:
            if self._joining is not None:
                self._joining.cancel()  # still joining: give up (the CLI says interrupted)
            self._quit.set()
            return
        if reply.run_id is None or reply.frozen:
            # Not started as far as we know, or a second Ctrl-C: stop waiting for it.
            if reply.task is not None:
                reply.task.cancel()
            return
        reply.frozen = True  # from here on nothing more of it is printed ...
        seen = self.shown.seen(reply)
        # ... so what was printed is exactly what it keeps.
        reply.cancelling = asyncio.get_running_loop().create_task(
            self._cancel(reply.run_id, seen))

    async def _as_reply(self, work: Any) -> None:
        """Run a turn (or the showing of one) so that Ctrl-C can stop it."""
        task = asyncio.ensure_future(work)
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            self.console.end_line()
            self.console.note("stopped waiting for the reply; it shows here when it lands")
        except GatewayError as exc:  # refused (thread gone, bad request): say it, go on
            self.console.end_line()
            self.console.note(str(exc))
        finally:
            if self._reply is not None and self._reply.cancelling is not None:
                self._reply.cancelling.cancel()
            self._reply = None

    async def _cancel(self, run_id: str, content_seen: str | None) -> None:
        for attempt in range(5):
            try:
                await self.gateway.cancel(self.thread.thread_id, run_id,
                                          self.options.device_id, content_seen)
                return
            except (httpx.TransportError, Dropped):
                await _backoff(attempt)
            except GatewayError as exc:
                self.console.note(f"could not stop the reply: {exc}")
                return
        self.console.note("could not stop the reply: the gateway does not answer")

    async def _catch_up(self) -> None:
        """Show what other devices did that is not on screen yet, a live reply included."""
        while not self._quit.is_set():
            active = self.thread.active_run
            self.shown.show_settled()
            if active is None or active.id in self.shown.followed:
                return
            await self._as_reply(self._follow_elsewhere(active))

    # -- runs -----------------------------------------------------------------------

    async def _turn(self, content: str) -> None:
        """Send a typed line as a turn and show its reply.

        The turn is named by its input id, so a POST that failed before the run was
        known (a cut connection, or a 502/503/504 while a gateway or its Redis
        restarts) is simply sent again until a gateway answers: a retry gets the run
        the turn already started, from its first event, and never starts a second one.
        Once the run is known, a broken stream is rejoined after its last event. A 409
        ``epoch_mismatch`` (the thread is under another epoch on the gateway: its device
        switched between the central Redis and its local store, or the thread was
        re-seeded) brings the whole thread, and the same turn is sent again.
        """
        input_id = f"msg-{secrets.token_hex(8)}"
        self.shown.typed(input_id, content)
        reply = self._reply = Reply(run_id=None, own=True, task=asyncio.current_task())
        body: dict[str, Any] = {
            "device_id": self.options.device_id,
            "input": {"id": input_id, "content": content},
            "multitask": "enqueue", "stream": True,
        }
        if self.options.max_tokens is not None:
            body["params"] = {"max_tokens": self.options.max_tokens}
        attempt = 0
        while reply.run_id is None:
            # The replica's cursor (the watch moves it on between tries): the opening
            # sync brings only what the replica lacks.
            body["epoch"], body["since"] = self.thread.cursor
            try:
                async with self.gateway.start_run(self.thread.thread_id, body) as events:
                    self._back_online()
                    await self._show_events(events, reply)
                    if reply.done:
                        return
                    raise Dropped("the reply stream ended early")
            except EpochMoved:
                attempt += 1
                try:
                    await self._sync_in_full()
                except (httpx.TransportError, Dropped) as exc:
                    self._dropped(exc)
                await _backoff(attempt)
            except (httpx.TransportError, Dropped) as exc:
                self._dropped(exc)
                if reply.run_id is None:
                    attempt += 1
                    await _backoff(attempt)
        await self._follow(reply)

    async def _sync_in_full(self) -> None:
        """The whole thread as the gateway has it now, in place of the replica's copy."""
        self.thread.apply_sync(await self.gateway.thread(self.thread.thread_id))
        self._changed.set()

    async def _follow_elsewhere(self, run: Run) -> None:
        reply = self._reply = Reply(run_id=run.id, own=False, task=asyncio.current_task())
        self.shown.followed.add(run.id)
        await self._follow(reply)

    async def _follow(self, reply: Reply) -> None:
        """Show the run's events until ``done``, rejoining after ``last_event_id``."""
        assert reply.run_id is not None
        attempt = 0
        while not reply.done:
            try:
                async with self.gateway.run_events(self.thread.thread_id, reply.run_id,
                                                   after=reply.last_event_id) as events:
                    self._back_online()
                    attempt = 0
                    await self._show_events(events, reply)
                    if not reply.done:
                        raise Dropped("the reply stream ended early")
            except Gone as exc:  # the thread expired meanwhile
                self.console.note(f"the reply is gone: {exc}")
                return
            except (httpx.TransportError, Dropped) as exc:
                self._dropped(exc)
                attempt += 1
                await _backoff(attempt)

    async def _show_events(self, events: Events, reply: Reply) -> None:
        async for event in events:
            if event.type == "sync":  # a turn's opening: what others did since our cursor
                self.thread.apply_sync(SyncState.from_json(event.data))
                self._changed.set()
                continue
            self.thread.apply_event(event.type, event.data)
            if event.id is not None:
                reply.last_event_id = event.id
            self.shown.on_event(event, reply)
            if event.type == "done":
                reply.done = True
                return

    # -- watching -------------------------------------------------------------------

    async def _watch(self) -> None:
        """Keep the replica up to date while the chat runs; rejoin after a drop."""
        attempt = 0
        while True:
            epoch, since = self.thread.cursor
            try:
                async with self.gateway.watch(self.thread.thread_id, epoch, since) as events:
                    async for event in events:  # an ``error`` event is Dropped
                        if event.type == "sync":
                            self._back_online()
                            attempt = 0
                            self.thread.apply_sync(SyncState.from_json(event.data))
                            self._changed.set()
                    raise Dropped("the watch stream ended")
            except Gone as exc:
                self.console.note(f"the thread is gone: {exc}")
                return
            except (httpx.TransportError, Dropped, GatewayError) as exc:
                self._dropped(exc)
                attempt += 1
                await _backoff(attempt)

    async def _watch_link(self) -> None:
        """Note when the gateway's device goes offline (it serves from its local store)
        and when it is back online with every offline change sent.

        A client of its own: /healthz needs no key, and the chat's connections stay
        the chat's (a poll never holds one a turn or a stream would use)."""
        async with httpx.AsyncClient(base_url=self.options.server, timeout=5.0) as probe:
            gateway = GatewayClient(probe, self.options.server)
            while True:
                self._note_link(await gateway.sync_link())
                await asyncio.sleep(LINK_POLL_INTERVAL)

    def _note_link(self, link: dict[str, Any] | None) -> None:
        if link is None:
            return
        offline = link.get("link") == "offline"
        pending = link.get("pending")
        if offline and not self._device_offline:
            self._device_offline = True
            self.console.note(
                f"offline, {pending} pending: the gateway cannot reach the central Redis and "
                "goes on from its own copy of the thread; changes are sent when the link is "
                "back")
            self._changed.set()  # the prompt again, below the note
        elif self._device_offline and not offline and pending == 0:
            self._device_offline = False
            self.console.note("back online: the offline changes are in the central Redis")
            self._changed.set()

    def _dropped(self, exc: Exception) -> None:
        if not self._offline_noted:
            self.console.note(f"lost the connection to {self.options.server} "
                              f"({reason(exc)}); reconnecting")
            self._offline_noted = True

    def _back_online(self) -> None:
        if self._offline_noted:
            self.console.note(f"reconnected to {self.options.server}")
            self._offline_noted = False


def _client(options: ChatOptions) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    return httpx.AsyncClient(base_url=options.server, headers=headers,
                             timeout=httpx.Timeout(10.0, read=30.0))


async def run_chat(options: ChatOptions, console: Console,
                   on_interrupt: Callable[[Callable[[], None]], None] | None = None) -> None:
    """Join the thread and chat until Ctrl-D (or Ctrl-C at the prompt).

    ``on_interrupt`` is given the session's Ctrl-C handler
    (:func:`edgebundle.terminal_chat.chat` wires it to SIGINT).
    """
    async with _client(options) as http:
        session = ChatSession(options, console, http)
        if on_interrupt is not None:
            on_interrupt(session.interrupt)
        console.start_reading()
        await session.join()
        await session.run()
