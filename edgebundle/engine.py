"""A running chat guest and its protocol client: one request at a time, in FIFO order.

:class:`Engine` owns one supervised guest process (``edgechat.wasm`` on wasmedge or
on the embedded runtime, see :mod:`edgebundle.runtime.launch`) and talks
:mod:`edgebundle.guest_protocol` over its stdin/stdout. The guest serves one request
at a time, so requests take turns: :meth:`Engine.generate` waits for the ones before
it (asyncio's lock wakes waiters first come, first served).

Threads and the event loop: a reader thread per guest process reads its stdout with
blocking reads and hands parsed events to the loop (``call_soon_threadsafe``);
everything else happens on the loop. The supervisor (its own thread) restarts a
guest that dies; a new guest is used once it said READY again. A guest that dies
mid-request ends that request with reason ``error`` (text already streamed stays).

Ending a request early: :meth:`Engine.cancel` writes ``STOP`` to the guest, which
ends the running request with ``END cancelled``; the caller keeps reading until the
End. A consumer that stops iterating (a client that went away) is handled the same
way in the background, so the next request never sees the old one's output.

:class:`ChatEngine` is what the layers above need of an engine (the chat's
:class:`~edgebundle.completion.ChatService`, the gateway's health and metrics): the boundary
where a test puts a double in place of the guest process.

Why it is over 400 lines: :class:`Engine` is one protocol client whose parts share one
state (the current guest, the request queue, the reader thread's hand-off to the
loop, a cancel in flight); the types it answers in (:class:`Delta`, :class:`End`,
:class:`ChatEngine`) are a few lines each and belong to it.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgebundle import guest_protocol as protocol
from edgebundle.errors import GuestProtocolError, SupervisorError
from edgebundle.runtime.launch import LaunchSpec
from edgebundle.runtime.supervisor import Backoff, RestartLimit, Supervisor, describe_exit

READY_TIMEOUT = 600.0  # loading a multi-GB model on a small device takes minutes
_POLL = 0.02  # seconds between looks at the guest while waiting for it to be ready

REASONS = ("eos", "length", "context_full", "prompt_too_long", "cancelled", "error")


@dataclass(frozen=True)
class Delta:
    """Generated text, decoded (a UTF-8 character split across pieces is kept whole)."""

    text: str


@dataclass(frozen=True)
class End:
    """The request is over: why (one of :data:`REASONS`) and the token counts."""

    reason: str
    input_tokens: int = 0
    output_tokens: int = 0
    errno: int = 0
    detail: str = ""  # for "error": what went wrong, in one line


class ChatEngine(Protocol):
    """What the chat and the gateway need of an engine; :class:`Engine` is the real one.

    ``generate`` streams one request's text and ends with one :class:`End` (never
    raising for a guest failure: that is ``End("error")``); ``cancel`` ends the running
    request early (``End("cancelled")``). ``ready``, ``restarts`` and the token counts
    are read by the gateway's /healthz and /metrics.
    """

    @property
    def ready(self) -> bool: ...

    @property
    def restarts(self) -> int: ...

    @property
    def input_tokens(self) -> int: ...

    @property
    def output_tokens(self) -> int: ...

    def generate(self, prompt: str, metadata: Mapping[str, Any],
                 max_tokens: int) -> AsyncGenerator[Delta | End, None]: ...

    async def cancel(self) -> None: ...


@dataclass(frozen=True)
class _Exited:
    """The guest's stdout ended: it exited (or is about to)."""

    code: int | None


class _Guest:
    """One guest process: its pipes, whether it said READY, and why it failed."""

    def __init__(self, proc: subprocess.Popen[bytes], number: int) -> None:
        self.proc = proc
        self.number = number
        self.ready = False
        self.exited = False
        self.fatal: protocol.Fatal | None = None
        self.reader: threading.Thread | None = None
        self._write_lock = threading.Lock()  # a STOP never lands inside a request's bytes

    def write(self, data: bytes) -> None:
        """Write all of ``data`` to the guest's stdin; OSError if it is gone."""
        with self._write_lock:
            stdin = self.proc.stdin
            if stdin is None or stdin.closed:
                raise BrokenPipeError("the guest's stdin is closed")
            view = memoryview(data)
            while view:
                view = view[os.write(stdin.fileno(), view) :]

    def close_stdin(self) -> None:
        with self._write_lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass


class _Request:
    def __init__(self, guest: _Guest) -> None:
        self.guest = guest
        self.queue: asyncio.Queue[protocol.Event | _Exited] = asyncio.Queue()
        self.done = False  # the End (or the guest's exit) was seen
        self.pieces = 0


class Engine:
    """A supervised chat guest serving requests one at a time.

    ``spec`` is the launch of an edgechat app (:func:`~edgebundle.runtime.launch.resolve_launch`);
    the guest's stderr and the supervisor's notes go to ``log_path``.
    """

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        log_path: Path,
        ready_timeout: float = READY_TIMEOUT,
        backoff: Backoff | None = None,
        restart_limit: RestartLimit | None = None,
        stop_grace: float = 5.0,
    ) -> None:
        self.spec = spec
        self.foreign_lines = 0  # lines of the runtime's own on the guest's stdout
        self.log_path = log_path
        self._ready_timeout = ready_timeout
        self._supervisor = Supervisor(
            spec,
            log_path=log_path,
            ready=self._guest_ready,
            backoff=backoff or Backoff(),
            restart_limit=restart_limit or RestartLimit(),
            stop_grace=stop_grace,
            pipes=True,
            on_spawn=self._on_spawn,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._guest: _Guest | None = None
        self._guests = 0
        self._active: _Request | None = None
        self._stopping = threading.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.input_tokens = 0  # prompt tokens evaluated, all requests so far (metrics)
        self.output_tokens = 0  # tokens generated, all requests so far, abandoned ones too

    # -- state ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while a guest is up and has said READY."""
        return self._guest_ready()

    @property
    def pid(self) -> int | None:
        """The pid of the running guest process (the one the supervisor started)."""
        return self._supervisor.pid

    @property
    def failure(self) -> SupervisorError | None:
        """Why the supervisor gave up restarting the guest, if it did."""
        return self._supervisor.failure

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the guest and wait until it is ready; SupervisorError if it cannot be."""
        self._loop = asyncio.get_running_loop()
        self._supervisor.start()
        try:
            ready = await asyncio.to_thread(
                self._supervisor.wait_ready, self._ready_timeout, self._stopping
            )
        except SupervisorError as exc:
            fatal = self._fatal_of_current()
            await self.stop()
            if fatal is not None:
                raise SupervisorError(
                    f"the chat guest could not load its model: {fatal.message} (WASI-NN errno "
                    f"{fatal.errno}); log: {self.log_path}"
                ) from None
            raise exc from None
        if not ready:
            raise SupervisorError("the engine was stopped while the chat guest was starting")

    async def stop(self) -> None:
        """Stop the guest (SIGTERM, then SIGKILL after the grace period); idempotent."""
        self._stopping.set()
        await asyncio.to_thread(self._supervisor.stop)
        guest = self._guest
        if guest is not None:
            guest.close_stdin()
            if guest.reader is not None:
                await asyncio.to_thread(guest.reader.join, 5.0)
        for task in list(self._background):
            task.cancel()

    # -- requests ------------------------------------------------------------------

    async def generate(
        self, prompt: str, metadata: Mapping[str, Any], max_tokens: int
    ) -> AsyncGenerator[Delta | End, None]:
        """Run one request: its text as it is generated, then one :class:`End`.

        ``max_tokens`` 0 means no limit (the model or the context ends it). Never
        raises for a guest failure: that ends the request with reason ``error``.
        """
        await self._lock.acquire()
        request: _Request | None = None
        released = False
        try:
            try:
                guest = await self._wait_ready()
            except SupervisorError as exc:
                released = True
                self._lock.release()
                yield End("error", detail=str(exc))
                return
            request = _Request(guest)
            self._active = request
            data = protocol.encode_request(
                prompt.encode("utf-8"),
                json.dumps(dict(metadata), separators=(",", ":")).encode("utf-8"),
                max_tokens,
            )
            try:
                await asyncio.to_thread(guest.write, data)
            except OSError:
                pass  # the guest is gone: its exit ends the request below
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while True:
                event = await request.queue.get()
                if isinstance(event, protocol.Delta):
                    request.pieces += 1
                    text = decoder.decode(event.data)
                    if text:
                        yield Delta(text)
                elif isinstance(event, protocol.End | _Exited):
                    self._finish(request)
                    end = self._end(event, request)
                    self._count(end.input_tokens, end.output_tokens)
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        yield Delta(tail)
                    yield end
                    return
        finally:
            if request is None:
                if not released:
                    self._lock.release()  # cancelled while waiting for the guest
            elif not request.done:
                self._abandon(request)

    async def cancel(self) -> None:
        """End the running request early (it ends with reason ``cancelled``); else nothing."""
        request = self._active
        if request is not None and not request.done:
            await asyncio.to_thread(self._send_stop, request.guest)

    # -- internals -----------------------------------------------------------------

    def _guest_ready(self) -> bool:
        guest = self._guest
        return guest is not None and guest.ready and not guest.exited

    def _fatal_of_current(self) -> protocol.Fatal | None:
        guest = self._guest
        if guest is None:
            return None
        if guest.reader is not None:
            guest.reader.join(2.0)  # its FATAL line may still be on the way
        return guest.fatal

    async def _wait_ready(self) -> _Guest:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        while True:
            guest = self._guest
            if guest is not None and guest.ready and not guest.exited:
                return guest
            failure = self._supervisor.failure
            if failure is not None:
                raise failure
            if self._stopping.is_set():
                raise SupervisorError("the chat engine is stopped")
            if loop.time() >= deadline:
                raise SupervisorError(
                    f"the chat guest was not ready after {self._ready_timeout:g} s; "
                    f"log: {self.log_path}"
                )
            await asyncio.sleep(_POLL)

    def _end(self, event: protocol.End | _Exited, request: _Request) -> End:
        if isinstance(event, _Exited):
            return End(
                "error",
                output_tokens=request.pieces,
                detail=f"the chat guest {describe_exit(event.code)} during the request "
                f"(it is restarted; log: {self.log_path})",
            )
        info = event.info
        input_tokens = info.get("input_tokens")
        output_tokens = info.get("output_tokens")
        return End(
            str(event.reason),
            input_tokens=input_tokens if isinstance(input_tokens, int) else 0,
            output_tokens=output_tokens if isinstance(output_tokens, int) else request.pieces,
            errno=event.errno,
            detail=""
            if event.reason != "error"
            else f"the chat guest failed the request (WASI-NN errno {event.errno}; log: "
            f"{self.log_path})",
        )

    def _count(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def _finish(self, request: _Request) -> None:
        """The request is over: let the next one in (exactly once)."""
        if request.done:
            return
        request.done = True
        if self._active is request:
            self._active = None
        self._lock.release()

    def _abandon(self, request: _Request) -> None:
        """The consumer left mid-request: stop the guest and drain to the End, then release."""
        task = asyncio.get_running_loop().create_task(self._drain(request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self, request: _Request) -> None:
        try:
            await asyncio.to_thread(self._send_stop, request.guest)
            while not isinstance(event := await request.queue.get(), protocol.End | _Exited):
                if isinstance(event, protocol.Delta):
                    request.pieces += 1
            end = self._end(event, request)
            self._count(end.input_tokens, end.output_tokens)
        finally:
            self._finish(request)

    def _send_stop(self, guest: _Guest) -> None:
        try:
            guest.write(protocol.STOP_LINE)
        except OSError:
            pass  # already gone: its exit ends the request

    # -- guest processes (called from the supervisor's and the readers' threads) ---

    def _on_spawn(self, proc: subprocess.Popen[bytes]) -> None:
        self._guests += 1
        guest = _Guest(proc, self._guests)
        self._guest = guest
        guest.reader = threading.Thread(
            target=self._read, args=(guest,), name=f"edgechat-reader-{guest.number}", daemon=True
        )
        guest.reader.start()

    def _read(self, guest: _Guest) -> None:
        stdout = guest.proc.stdout
        assert stdout is not None
        parser = protocol.GuestOutputParser(self.spec.frame)
        fd = stdout.fileno()
        try:
            while data := os.read(fd, 65536):
                try:
                    events = parser.feed(data)
                except GuestProtocolError as exc:
                    # Out of step for good: end this guest (EOF on its stdin), let it restart.
                    self._supervisor.note(f"{exc}; closing its stdin so it exits")
                    guest.close_stdin()
                    while os.read(fd, 65536):
                        pass
                    break
                for event in events:
                    if isinstance(event, protocol.Foreign):
                        # the runtime's log (genuine WasmEdge's plugin logs to stdout)
                        self.foreign_lines += 1
                        text = event.text.decode("utf-8", "replace")[:500]
                        self._supervisor.note(f"runtime: {text}")
                    elif isinstance(event, protocol.Ready):
                        guest.ready = True
                        self._supervisor.mark_ready()
                    elif isinstance(event, protocol.Fatal):
                        guest.fatal = event
                        self._supervisor.note(f"guest: FATAL {event.errno} {event.message}")
                self._post(guest, [e for e in events if not isinstance(e, protocol.Foreign)])
        except OSError as exc:
            self._supervisor.note(f"reading the guest's stdout failed: {exc}")
        finally:
            guest.exited = True
            guest.close_stdin()
            stdout.close()
            self._post(guest, [_Exited(self._exit_code(guest))])

    @staticmethod
    def _exit_code(guest: _Guest) -> int | None:
        # Only the supervisor reaps (see Supervisor._signal); this just looks, briefly.
        for _ in range(100):
            if guest.proc.returncode is not None:
                break
            time.sleep(0.01)
        return guest.proc.returncode

    def _post(self, guest: _Guest, events: Sequence[protocol.Event | _Exited]) -> None:
        loop = self._loop
        if loop is None or not events:
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, guest, events)
        except RuntimeError:
            pass  # the loop is closed: nobody waits for these any more

    def _dispatch(self, guest: _Guest, events: Sequence[protocol.Event | _Exited]) -> None:
        request = self._active
        if request is None or request.guest is not guest:
            return  # READY, or output of a guest no request waits for
        for event in events:
            request.queue.put_nowait(event)
