"""The terminal chat (``edgebundle chat``): a client device of a gateway's HTTP sync API.

It joins one thread (``POST /v1/threads``), prints its history, and then, while it
waits for the next line, watches the thread (``GET …/watch``) so that turns made on
other devices appear as they land: their user message, and their live reply by
following the run's events. Those lines are marked with the device id of the run
(``[devB] assistant: …``). A typed line starts a run (``POST …/runs``, streamed)
whose reply is printed as its ``message.delta`` events arrive. The turn is named by
its input id: a POST whose answer was lost is sent again as is, and the gateway
answers the retry with the run the turn started, so a turn never runs twice.

What is printed is what the :class:`~edgebundle.sync.replica.Replica` holds: every
event goes to the replica first, and only the part of a message's text beyond what
was already printed is written. The replica drops replayed deltas by
``(message_id, seq)``, so a rejoined stream (after a dropped connection, resumed
with ``Last-Event-ID``) never prints text twice.

A gateway whose device keeps a local store (offline-first, see
:mod:`edgebundle.sync.replication`) says on ``/healthz`` whether it reaches the central
Redis; the chat asks every few seconds and notes "offline, N pending" when the device
starts serving from its local store, and "back online" once its offline changes are
in the central store.

Ctrl-C during a reply stops it for everyone: printing stops at once and the run is
cancelled with ``content_seen`` = exactly the text printed, which is then what the
thread stores (and what the model sees next). A second Ctrl-C stops waiting for
the cancel to be confirmed. Ctrl-C or Ctrl-D at the prompt ends the chat.

The device id of the chat is ``--device-id``, else the configured ``device_id``
(``EDGEBUNDLE_DEVICE_ID`` or config.toml), else one made on first use
(``chat-<hex>``) and kept in ``<home>/state/chat-device-id``: the chat is a device
of its own, apart from the gateway it talks to.

This module is the terminal (lines in, text out, Ctrl-C) and what it shows; the HTTP
of the gateway is :class:`~edgebundle.gateway_client.GatewayClient`'s.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import random
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from edgebundle import keys
from edgebundle.config import Settings, local_gateway_url
from edgebundle.device_ids import kept_device_id
from edgebundle.errors import ConfigError, GatewayError
from edgebundle.gateway_client import (
    Dropped,
    EpochMoved,
    Events,
    GatewayClient,
    Gone,
    reason,
)
from edgebundle.sse import Event
from edgebundle.sync.models import Run, SyncState, ThreadMessage
from edgebundle.sync.replica import Replica

CHAT_DEVICE_FILE = "chat-device-id"
BACKOFF_FIRST = 0.2  # s, doubled per failed attempt up to BACKOFF_MAX, with jitter
BACKOFF_MAX = 5.0
LINK_POLL_INTERVAL = 3.0  # s between looks at the gateway's /healthz (its central link)


@dataclass(frozen=True)
class ChatOptions:
    server: str
    thread_id: str | None = None
    device_id: str = ""
    api_key: str | None = None
    max_tokens: int | None = None


def check_server(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad --server {url!r}: use the gateway's URL, such as "
                          "http://127.0.0.1:8080")
    return url.rstrip("/")


def chat_device_id(settings: Settings) -> str:
    """The configured device id, else the chat's own, made once and kept in the state dir
    (a read-only home: an id for this session only)."""
    return kept_device_id(settings, CHAT_DEVICE_FILE, "chat", unkept_ok=True)


def chat_options(settings: Settings, *, server: str | None, thread_id: str | None,
                 max_tokens: int | None) -> ChatOptions:
    """Options for :func:`chat` from the settings and the command line."""
    return ChatOptions(
        server=check_server(server or local_gateway_url(settings)),
        thread_id=None if thread_id is None else keys.check_id("thread", thread_id),
        device_id=chat_device_id(settings),
        api_key=settings.api_key,
        max_tokens=max_tokens,
    )


# -- the terminal ---------------------------------------------------------------------


class Console:
    """Where the chat reads lines and writes text: stdout for the conversation, stderr
    for notes. Lines are read by a daemon thread (raw reads of the descriptor, so the
    thread holds no lock of ``sys.stdin`` when the process exits)."""

    def __init__(self, stdin_fd: int = 0, out: IO[str] | None = None,
                 err: IO[str] | None = None) -> None:
        self.stdin_fd = stdin_fd
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.interactive = os.isatty(stdin_fd)
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._at_line_start = True
        self._prompt_shown = False

    def start_reading(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), daemon=True,
                         name="chat-stdin").start()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self.stdin_fd, 4096)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            *lines, pending = pending.split("\n")
            if not chunk:
                lines += [pending] if pending else []
            try:
                for line in lines:
                    loop.call_soon_threadsafe(self._lines.put_nowait, line.rstrip("\r"))
                if not chunk:
                    loop.call_soon_threadsafe(self._lines.put_nowait, None)
                    return
            except RuntimeError:  # the chat ended (its loop is closed): nobody reads on
                return

    async def next_line(self) -> str | None:
        """The next typed line, None at end of input (Ctrl-D)."""
        return await self._lines.get()

    def write(self, text: str) -> None:
        if not text:
            return
        if self._prompt_shown:  # something arrived while the prompt waited
            self.out.write("\n")
            self._prompt_shown = False
        self.out.write(text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        if not self._at_line_start:
            self.write("\n")

    def prompt(self) -> None:
        """Show the prompt (on a terminal only: piped output stays the conversation)."""
        if self.interactive and not self._prompt_shown:
            self.end_line()
            self.out.write("> ")
            self.out.flush()
            self._prompt_shown = True

    def typed(self) -> None:
        """The user ended a line: the prompt is no longer on screen."""
        self._prompt_shown = False
        self._at_line_start = True

    def note(self, text: str) -> None:
        if self._prompt_shown:  # a note while waiting: not on the prompt's line
            self.out.write("\n")
            self.out.flush()
            self._prompt_shown = False
        self.err.write(f"edgebundle: {text}\n")
        self.err.flush()


# -- retrying ---------------------------------------------------------------------


async def _backoff(attempt: int) -> None:
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 10))
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))


# -- the session ----------------------------------------------------------------------


@dataclass
class _Reply:
    """A run being shown: where its events got to, and what Ctrl-C did to it."""

    run_id: str | None
    own: bool
    last_event_id: str | None = None
    message_id: str | None = None
    frozen: bool = False  # Ctrl-C: show nothing more of it but its final copy
    done: bool = False
    task: asyncio.Task[Any] | None = None
    cancelling: asyncio.Task[None] | None = field(default=None, repr=False)


class TerminalChat:
    """One chat session on one thread; :meth:`run` until Ctrl-C/Ctrl-D at the prompt."""

    def __init__(self, options: ChatOptions, console: Console,
                 http: httpx.AsyncClient) -> None:
        self.options = options
        self.console = console
        self.gateway = GatewayClient(http, options.server)
        self.replica: Replica | None = None
        self._printed: dict[str, str] = {}  # message id -> the text of it shown so far
        self._finished: set[str] = set()  # messages shown to their end
        self._my_runs: set[str] = set()
        self._followed: set[str] = set()  # runs shown live (or being shown)
        self._reply: _Reply | None = None
        self._changed = asyncio.Event()
        self._quit = asyncio.Event()
        self._offline_noted = False  # the gateway itself does not answer
        self._device_offline = False  # the gateway answers from its local store
        self._joining: asyncio.Task[Any] | None = None

    # -- joining --------------------------------------------------------------------

    @property
    def thread(self) -> Replica:
        assert self.replica is not None, "join first"
        return self.replica

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
        self.replica = Replica(state.id)
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
            self._show(message, f"{message.role}: ")
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
        seen = None if reply.message_id is None else self._printed.get(reply.message_id, "")
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

    # -- showing messages -----------------------------------------------------------

    def _run_of(self, message: ThreadMessage) -> Run | None:
        runs = self.thread.runs()
        if message.run_id is not None:
            return runs.get(message.run_id)
        return next((r for r in runs.values() if r.input_message_id == message.id), None)

    def _label(self, message: ThreadMessage) -> str:
        run = self._run_of(message)
        mine = run is not None and (run.id in self._my_runs
                                    or run.device_id == self.options.device_id)
        if mine:
            return f"{message.role}: "
        device = run.device_id if run is not None and run.device_id else "elsewhere"
        return f"[{device}] {message.role}: "

    def _show(self, message: ThreadMessage, label: str | None = None) -> None:
        """Print what of ``message`` was not printed yet; end its line when it is final."""
        if message.id in self._finished or message.deleted:
            return
        printed = self._printed.get(message.id)
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
        self._printed[message.id] = message.content
        if message.status != "in_progress":
            self.console.end_line()
            self._finished.add(message.id)

    async def _catch_up(self) -> None:
        """Show what other devices did that is not on screen yet, a live reply included."""
        while not self._quit.is_set():
            active = self.thread.active_run
            for message in self.thread.messages():
                if message.status == "in_progress" and message.role == "assistant":
                    continue  # shown live by following its run (or when it is final)
                self._show(message)
            if active is None or active.id in self._followed:
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
        self._printed[input_id] = content  # it is on screen: the user typed it
        self._finished.add(input_id)
        reply = self._reply = _Reply(run_id=None, own=True, task=asyncio.current_task())
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
        reply = self._reply = _Reply(run_id=run.id, own=False, task=asyncio.current_task())
        self._followed.add(run.id)
        await self._follow(reply)

    async def _follow(self, reply: _Reply) -> None:
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

    async def _show_events(self, events: Events, reply: _Reply) -> None:
        async for event in events:
            if event.type == "sync":  # a turn's opening: what others did since our cursor
                self.thread.apply_sync(SyncState.from_json(event.data))
                self._changed.set()
                continue
            self.thread.apply_event(event.type, event.data)
            if event.id is not None:
                reply.last_event_id = event.id
            self._on_event(event, reply)
            if event.type == "done":
                reply.done = True
                return

    def _on_event(self, event: Event, reply: _Reply) -> None:
        data = event.data
        if event.type.startswith("run."):
            run = Run.from_json(data["run"])
            if reply.run_id is None:
                reply.run_id = run.id
            if reply.own:
                self._my_runs.add(run.id)
            self._followed.add(run.id)
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
        self._show(message)

    def _ended(self, run: Run, event: Event, reply: _Reply) -> None:
        if event.type == "run.failed":
            self.console.end_line()
            self.console.note(f"the reply failed: {event.data.get('error') or 'no reason given'}")
        elif not reply.frozen:  # stopped from elsewhere (our own Ctrl-C needs no word)
            self.console.end_line()
            cause = "interrupted by an edit" if run.reason == "interrupted" else "stopped"
            self.console.note(f"the reply was {cause} on another device")

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

    ``on_interrupt`` is given the session's Ctrl-C handler (:func:`chat` wires it to
    SIGINT).
    """
    async with _client(options) as http:
        session = TerminalChat(options, console, http)
        if on_interrupt is not None:
            on_interrupt(session.interrupt)
        console.start_reading()
        await session.join()
        await session.run()


def chat(options: ChatOptions, console: Console | None = None) -> None:
    """The ``edgebundle chat`` session on this terminal; raises EdgebundleError subclasses."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        handlers: list[Callable[[], None]] = []

        def interrupted() -> None:
            if handlers:
                handlers[0]()
            elif main_task is not None:  # before the session exists: give up at once
                main_task.cancel()

        loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            await run_chat(options, console or Console(), handlers.append)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:  # Ctrl-C while joining
        raise KeyboardInterrupt from None
