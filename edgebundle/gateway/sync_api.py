"""The sync routes of the gateway (docs/api.md): threads, pushes, runs and their events.

Mounted by :func:`edgebundle.gateway.app.create_app` when the gateway has a
:class:`~edgebundle.sync.service.SyncService`. Every device serves the same routes
over the same Redis, so a thread started on one device continues on any other.

The device that starts a run also generates it (:class:`RunGenerator`): in a task of
its own, not tied to the HTTP request, because other devices may be watching the run
and a client whose connection drops rejoins it through ``…/events``. The task waits
for the run's turn (queued runs wait), renders the prompt from the synced thread on
this device (every device renders the same messages with the same template: the
thread up to and including the run's input, see :mod:`edgebundle.sync.runs`) and
streams the engine's text into the run. A run cancelled or interrupted elsewhere
makes the next write fail (LeaseLostError); the engine request is then stopped.

When the run cannot go on, it ends ``incomplete`` (its text kept, the next turn
builds on it) rather than waiting for its lease to run out:

- the guest died (or the engine broke off) mid-reply: the text so far is written and
  the run interrupted (cause ``engine_error``); the supervisor restarts the guest.
- Redis went away mid-run: the lease rides it out (:mod:`edgebundle.sync.lock`), so
  a restart of a few seconds changes nothing. Once the lease is over the engine
  request is stopped and the run ended with the text Redis had acknowledged, retried
  with backoff until Redis answers; usually it was ended meanwhile (lease expired) by
  whoever read it first. If Redis stays away longer than two leases the device gives
  up; the next reader or run then ends it, as for a device that died.

A turn is idempotent by its input id (or an ``Idempotency-Key`` header): a retry gets
the run it started (see :func:`start_turn`).

Errors are JSON ``{"error": code, "message": …}`` (plus the fields the client needs:
``epoch`` for ``epoch_mismatch``, ``active_run`` for ``thread_busy``). A request is
checked completely before anything is written, so a bad one changes nothing; that
includes the caps of :mod:`edgebundle.gateway.limits` (413 ``message_too_large``, 409
``thread_full``, 429 ``too_many_streams`` / ``too_many_runs`` / ``queue_full`` with
``Retry-After``). A 503 ``redis_unavailable`` does not say where the sync Redis is
(the log does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, cast

from redis.exceptions import RedisError as RedisPyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgebundle.chat import ChatParams, ChatService, Finished, TextDelta, Usage
from edgebundle.context_window import check_policy
from edgebundle.errors import (
    EdgebundleError,
    EpochMismatchError,
    LeaseLostError,
    OfflineError,
    RedisError,
    RunNotFoundError,
    ThreadBusyError,
    ThreadNotFoundError,
    UsageError,
)
from edgebundle.gateway.limits import RETRY_AFTER, Full, Holding, Limits, Slot, Slots
from edgebundle.gateway.openai_api import INVALID_JSON, parse_json
from edgebundle.guest_protocol import MAX_TOKENS
from edgebundle.sync import keys
from edgebundle.sync.events import EVENT_ID
from edgebundle.sync.lock import RunLease
from edgebundle.sync.models import MULTITASK_POLICIES, Message, Run, SyncState
from edgebundle.sync.runs import RunTicket
from edgebundle.sync.service import RunEvent, ThreadSize, ThreadSync
from edgebundle.sync.store import check_mutation
from edgebundle.templates import Message as PromptMessage

log = logging.getLogger(__name__)

# The chat's finish reasons in the run's words: a stop string ends the turn like eos.
_RUN_REASONS = {"eos": "eos", "stop": "eos", "length": "length", "context_full": "context_full"}
# In a run's error when its prompt does not fit the model's context (a failed run
# carries only its message; chat completions answer that one with a 400).
TOO_LONG = "more than the model's context allows"
WATCH_KEEPALIVE = 15.0  # seconds of silence before a watch stream sends a comment
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OUTAGE_RETRY = (0.2, 2.0)  # s: first and longest wait between attempts to end a run
REDIS_UNAVAILABLE = ("the sync Redis is unavailable: try again in a few seconds (the device's "
                     "log says why)")
MAX_VERSION = 2**53 - 1  # a thread's version is a Lua number: exact up to here
_VERSION = re.compile(r"[0-9]{1,16}")


class ApiError(Exception):
    """A request the sync API refuses: HTTP ``status``, ``code`` and one-line message."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def response(self) -> JSONResponse:
        body = {"error": self.code, "message": self.message, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def redis_unavailable(exc: Exception) -> ApiError:
    """The 503 for a sync Redis that did not answer. Clients learn that, not where it
    is: the driver's text names the internal host and port, so it goes to the log."""
    log.warning("the sync Redis is unavailable: %s", exc)
    return ApiError(503, "redis_unavailable", REDIS_UNAVAILABLE)


def api_error(exc: EdgebundleError) -> ApiError:
    """The HTTP answer for an error of the sync core."""
    if isinstance(exc, EpochMismatchError):
        return ApiError(409, "epoch_mismatch", str(exc), epoch=exc.epoch)
    if isinstance(exc, ThreadBusyError):
        error = ApiError(409, "thread_busy", str(exc),
                         active_run=exc.active_run.to_json() if exc.active_run else None)
        error.headers["Retry-After"] = str(exc.retry_after)
        return error
    if isinstance(exc, ThreadNotFoundError):
        return ApiError(404, "thread_not_found", str(exc))
    if isinstance(exc, RunNotFoundError):
        return ApiError(404, "run_not_found", str(exc))
    if isinstance(exc, LeaseLostError):
        return ApiError(409, "run_ended", str(exc))
    if isinstance(exc, UsageError):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, RedisError):
        return redis_unavailable(exc)
    if isinstance(exc, OfflineError):
        return ApiError(503, "offline", str(exc))
    return ApiError(500, "sync_error", str(exc))


# -- request parsing (all checks before any write) ------------------------------------


async def _body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if optional and not raw.strip():
        return {}
    try:
        body = parse_json(raw)
    except ValueError:
        raise ApiError(400, "invalid_json", INVALID_JSON) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    return body


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _id(kind: str, value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{field} must be a string id")
    try:
        return keys.check_id(kind, value)
    except UsageError as exc:
        raise _bad(f"{field}: {exc}") from None


def _int(body: dict[str, Any], field: str, default: int | None = None, low: int = 0) -> int:
    value = body.get(field, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{field} must be an integer")
    if not low <= value <= MAX_VERSION:
        raise _bad(f"{field} must be between {low} and {MAX_VERSION}, got {value}")
    return value


def _epoch(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad("epoch must be a string (the epoch of the client's last sync)")
    return value


def _since_query(request: Request) -> int:
    raw = request.query_params.get("since", "0")
    # ASCII digits only: str.isdigit() takes "²" or "٣", which int() then refuses.
    if not _VERSION.fullmatch(raw) or int(raw) > MAX_VERSION:
        raise _bad(f"since must be a version, a whole number from 0 to {MAX_VERSION}, "
                   f"not {raw!r}")
    return int(raw)


def _mutations(value: Any, limits: Limits) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad("mutations must be a list of {mid, op, message} objects")
    for index, item in enumerate(value):
        where = f"mutations[{index}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object with mid, op and message")
        mid = item.get("mid")
        if isinstance(mid, bool) or not isinstance(mid, int) or mid < 1:
            raise _bad(f"{where}.mid must be a positive integer")
        if item.get("op") not in ("put", "delete"):
            raise _bad(f"{where}.op must be put or delete")
        message = item.get("message")
        if not isinstance(message, dict):
            raise _bad(f"{where}.message must be an object")
        _id("message", message.get("id"), f"{where}.message.id")
        if item["op"] == "put":
            if message.get("role") not in ("system", "user", "assistant"):
                raise _bad(f"{where}.message.role must be system, user or assistant")
            if not isinstance(message.get("content"), str):
                raise _bad(f"{where}.message.content must be a string")
            check_content(limits, message["content"], f"{where}.message.content")
        try:  # the store's own checks too (status, position <= MAX_POSITION, run_id …)
            check_mutation(item)
        except UsageError as exc:
            raise _bad(f"{where}: {exc}") from None
    return value


@dataclass(frozen=True)
class RunRequest:
    device_id: str
    epoch: str | None
    since: int
    content: str
    input_id: str | None
    multitask: str
    params: ChatParams
    stream: bool


def idempotent_input_id(input_id: str | None, idempotency_key: str | None) -> str | None:
    """The turn's input id: the one given, else one derived from an ``Idempotency-Key``
    header (the same key names the same turn of a thread), else None (a new one)."""
    if input_id is not None or idempotency_key is None:
        return input_id
    if not 1 <= len(idempotency_key) <= 255 or not idempotency_key.isprintable() \
            or not idempotency_key.isascii():
        raise _bad("the Idempotency-Key header must be 1-255 printable ASCII characters")
    return "idem-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]


def parse_run_request(body: dict[str, Any], default_device: str,
                      idempotency_key: str | None = None) -> RunRequest:
    device = body.get("device_id", default_device)
    given = body.get("input")
    if not isinstance(given, dict) or not isinstance(given.get("content"), str):
        raise _bad('input must be an object {"content": "…"} with the user\'s message')
    if not given["content"].strip():
        raise _bad("input.content is empty: send the user's message")
    input_id = given.get("id")
    multitask = body.get("multitask", "enqueue")
    if multitask not in MULTITASK_POLICIES:
        raise _bad(f"multitask must be one of {', '.join(MULTITASK_POLICIES)}, "
                   f"not {multitask!r}")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean")
    return RunRequest(
        device_id=_id("device", device, "device_id"),
        epoch=_epoch(body.get("epoch")),
        since=_int(body, "since", 0),
        content=given["content"],
        input_id=idempotent_input_id(
            None if input_id is None else _id("message", input_id, "input.id"), idempotency_key),
        multitask=multitask,
        params=_params(body.get("params")),
        stream=stream,
    )


def _params(value: Any) -> ChatParams:
    if value is None:
        return ChatParams()
    if not isinstance(value, dict):
        raise _bad("params must be an object such as {\"max_tokens\": 256}")
    max_tokens = value.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= MAX_TOKENS):
        raise _bad(f"params.max_tokens must be an integer between 1 and {MAX_TOKENS}")
    temperature = value.get("temperature")
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, int | float)
                                    or not 0 <= temperature <= 2):
        raise _bad("params.temperature must be a number between 0 and 2")
    return ChatParams(max_tokens=max_tokens,
                      temperature=None if temperature is None else float(temperature))


# -- generating runs on this device --------------------------------------------------


def prompt_messages(messages: tuple[Message, ...], run: Run) -> list[PromptMessage]:
    """The thread as the model sees it for ``run``: the visible messages by position up
    to and including the run's input, minus the reply being written and replies stopped
    before any text (the person saw nothing of them).

    Later messages (inputs of runs queued behind this one, messages pushed after it
    started) are not part of this turn. UsageError if the input was deleted meanwhile.
    """
    by_id = {m.id: m for m in messages}
    given = by_id.get(run.input_message_id or "")
    if given is None or given.deleted:
        raise UsageError(f"its input message {run.input_message_id} was deleted before the "
                         "run's turn came")
    visible = [m for m in messages if not m.deleted and m.id != run.message_id
               and m.position <= given.position and (m.content or m.role != "assistant")]
    visible.sort(key=lambda m: m.position)
    return [PromptMessage(m.role, m.content) for m in visible]


class RunGenerator:
    """Generates this device's runs in background tasks (see the module docstring)."""

    def __init__(self, sync: ThreadSync, chat: ChatService,
                 context_policy: str = "window", limits: Limits | None = None) -> None:
        self.sync = sync
        self.chat = chat
        self.limits = limits or Limits()
        # Requests that start or follow a turn (edgebundle.gateway.limits: max_runs).
        self.turns = Slots(self.limits.max_runs, self.limits.max_queued_runs + 1)
        # "window": a run's prompt leaves out the oldest messages that do not fit the
        # context (edgebundle.context_window); "fail": the whole thread or prompt_too_long.
        self.context_policy = check_policy(context_policy)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by run id
        self.ended: Counter[str] = Counter()  # runs generated here, by final status (metrics)
        self.windowed_runs = 0  # completed runs whose prompt left messages out (metrics)
        self.dropped_messages = 0  # the messages they left out, in all (metrics)

    @property
    def running(self) -> int:
        """Runs generating here, or waiting for their turn to."""
        return len(self._tasks)

    def start(self, ticket: RunTicket, params: ChatParams) -> None:
        """Generate the ticket's run here, unless this device already is."""
        run_id = ticket.run.id
        if run_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._generate(ticket, params))
        self._tasks[run_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run_id, None))

    async def close(self) -> None:
        """Stop every run generating here (each ends failed, its text kept)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _generate(self, ticket: RunTicket, params: ChatParams) -> None:
        thread_id, run_id = ticket.run.thread_id, ticket.run.id
        try:
            await self._hold_and_write(ticket, params)
            self.ended[(await self.sync.get_run(thread_id, run_id)).status] += 1
        except (EdgebundleError, RedisPyError, OSError) as exc:
            # Nobody awaits this task: say it in the log. Redis unreachable: the run's
            # lease runs out and the next acquire (or a reader) ends it as incomplete.
            log.warning("run %s of thread %s: %s", run_id, thread_id, exc)

    async def _hold_and_write(self, ticket: RunTicket, params: ChatParams) -> None:
        try:
            lease = await self._acquire(ticket)
        except LeaseLostError:
            return  # cancelled before its turn came
        async with lease:
            try:
                await self._write(lease, params)
            except LeaseLostError:
                pass  # cancelled or interrupted elsewhere: the engine request was stopped
            except (RedisError, RedisPyError, OSError) as exc:
                # Leaving _write stopped the engine request; Redis must hear the end.
                await self._end_after_outage(lease, exc)
            except EdgebundleError as exc:
                with contextlib.suppress(LeaseLostError):
                    await lease.fail(str(exc))

    async def _acquire(self, ticket: RunTicket) -> RunLease:
        """Wait for the run's turn; through a Redis outage too (a queued run whose device
        stopped waiting would keep its place in line until someone ended it)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # from the first failure: waiting in line is no outage
        delay, longest = OUTAGE_RETRY
        while True:
            try:
                return await self.sync.acquire(ticket)
            except RedisError as exc:
                if deadline is None:
                    deadline = loop.time() + 2 * self.sync.settings.lease_ms / 1000
                if loop.time() + delay > deadline:
                    raise
                log.warning("run %s of thread %s: waiting for its turn: %s; retrying",
                            ticket.run.id, ticket.run.thread_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def _end_after_outage(self, lease: RunLease, error: Exception) -> None:
        """End a run whose writes failed as incomplete, once Redis answers again."""
        thread_id, run_id = lease.run.thread_id, lease.run.id
        log.warning("run %s of thread %s: Redis is unavailable (%s); its generation was "
                    "stopped and it ends as incomplete when Redis is back", run_id, thread_id,
                    error)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.sync.settings.lease_ms / 1000
        delay, longest = OUTAGE_RETRY
        while True:
            try:
                await lease.interrupt("redis_unavailable", keep_pending=False)
                log.warning("run %s of thread %s: ended as incomplete after the Redis outage",
                            run_id, thread_id)
                return
            except LeaseLostError:
                # Its lease ran out meanwhile (or it was cancelled): reading the run ends
                # it now if nobody did yet, instead of at the next reader or run.
                with contextlib.suppress(EdgebundleError):
                    await self.sync.get_run(thread_id, run_id)
                return
            except (RedisPyError, OSError) as exc:
                if loop.time() + delay > deadline:
                    log.warning("run %s of thread %s: Redis still unavailable (%s); the run "
                                "ends when its lease runs out", run_id, thread_id, exc)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def _write(self, lease: RunLease, params: ChatParams) -> None:
        state = await lease.thread()  # where the run lives (a device's router may lag)
        try:
            messages = prompt_messages(state.messages, lease.run)
            events = self.chat.complete(messages, params,
                                        fit_context=self.context_policy == "window")
            first = await anext(events)
        except UsageError as exc:
            await lease.fail(f"the thread cannot be rendered as a prompt: {exc}")
            return
        finished: Finished | None = None
        async with aclosing(events):  # leaving early stops the engine request
            event: TextDelta | Finished | None = first
            while event is not None:
                if isinstance(event, Finished):
                    finished = event
                    break
                await lease.delta(event.text)
                if lease.lost:
                    raise LeaseLostError("the run ended elsewhere")
                event = await anext(events, None)
        if finished is not None and finished.reason == "error":
            # The guest died (it is restarted) or broke off mid-reply: what it wrote so far
            # stays, and the next turn builds on it like on a stopped reply.
            log.warning("run %s of thread %s: the engine broke off: %s", lease.run.id,
                        lease.run.thread_id, finished.detail or "no detail")
            await lease.interrupt("engine_error")
            return
        if finished is None or finished.reason not in _RUN_REASONS:
            reason = finished.reason if finished else "no result"
            detail = finished.detail if finished and finished.detail else reason
            if finished is not None and finished.reason == "prompt_too_long":
                detail = too_long_detail(finished.usage)
            await lease.fail(detail)
            return
        dropped = finished.usage.dropped_messages or 0
        usage = {"input_tokens": finished.usage.input_tokens,
                 "output_tokens": finished.usage.output_tokens,
                 "dropped_messages": dropped}
        await lease.finish(_RUN_REASONS[finished.reason], usage)
        if dropped:
            self.windowed_runs += 1
            self.dropped_messages += dropped


def too_long_detail(usage: Usage) -> str:
    """A failed run's error when its prompt does not fit the context (holds TOO_LONG)."""
    if usage.dropped_messages is None:  # the whole thread was the prompt
        return (f"the thread is {usage.input_tokens} tokens, {TOO_LONG}: delete older "
                "messages of the thread or start a new one")
    # Windowed: every older message was left out, and the rest still does not fit.
    return (f"its input is {usage.input_tokens} tokens with the system prompt, {TOO_LONG} "
            "even without the thread's older messages: shorten the message")


async def start_turn(runner: RunGenerator, thread_id: str,
                     request: RunRequest) -> tuple[RunTicket, SyncState]:
    """Start a turn on the thread and generate it on this device: the ticket, and the
    sync object its stream opens with (the whole thread for a client without an epoch).

    A retry (the input id already started a run, ``ticket.again``) starts nothing new.
    If that run is still waiting for its turn this device waits for it too: the device
    that started it may have lost it (its Redis call failed after Redis had taken it),
    and whichever device takes the turn first generates it, once (the lock decides).

    What ``POST /v1/threads/{id}/runs`` and chat completions with ``thread_id`` share.
    """
    sync = runner.sync
    await check_room(runner, thread_id, request.content, request.input_id)
    epoch, since = request.epoch, request.since
    if epoch is None:  # a client new to the thread (curl): it gets the whole history
        epoch, since = (await sync.sync(thread_id, None, 0)).epoch, 0
    ticket = await sync.start_run(
        thread_id, request.device_id, epoch=epoch, since=since,
        content=request.content, input_id=request.input_id, multitask=request.multitask,
    )
    if not ticket.again or ticket.run.status == "queued":
        runner.start(ticket, request.params)
    opening = ticket.sync if request.epoch else replace(ticket.sync, full=True)
    return ticket, opening


async def check_room(runner: RunGenerator, thread_id: str, content: str,
                     input_id: str | None = None) -> None:
    """Refuse a turn the caps leave no room for (edgebundle.gateway.limits): its input
    too large, this device at ``max_runs``, the thread full or its queue at
    ``max_queued_runs``; before anything is written. A retry of a turn that already
    started a run adds nothing: it gets its run whatever the caps say."""
    limits = runner.limits
    check_content(limits, content, "input.content")
    size = await runner.sync.size(thread_id, input_id)
    if size.started:
        return
    if runner.running >= limits.max_runs:
        raise busy("too_many_runs", f"this device has {runner.running} turns going, its cap "
                   "(max_runs): try again in a few seconds")
    check_thread_room(limits, thread_id, size, 2)  # the input and the reply
    if size.queued_runs >= limits.max_queued_runs:
        raise busy("queue_full", f"thread {thread_id} has {size.queued_runs} runs waiting in "
                   "line, its cap (max_queued_runs): try again when one has ended")


def check_thread_room(limits: Limits, thread_id: str, size: ThreadSize, adding: int) -> None:
    """409 ``thread_full`` if ``adding`` more messages pass ``max_thread_messages``."""
    held = size.messages
    if adding and held + adding > limits.max_thread_messages:
        raise ApiError(409, "thread_full", f"thread {thread_id} holds {held} messages, "
                       f"{limits.max_thread_messages} at most (max_thread_messages, deleted "
                       "ones included): start a new thread")


def check_content(limits: Limits, content: str, field: str) -> None:
    """413 ``message_too_large`` for content over ``max_message_bytes`` (UTF-8)."""
    size = len(content.encode("utf-8", "surrogatepass"))
    if size > limits.max_message_bytes:
        raise ApiError(413, "message_too_large", f"{field} is {size} bytes, more than "
                       f"{limits.max_message_bytes} (max_message_bytes): shorten it")


def busy(code: str, message: str) -> ApiError:
    """A 429 that says when to try again."""
    error = ApiError(429, code, message)
    error.headers["Retry-After"] = str(RETRY_AFTER)
    return error


def take(slots: Slots, thread_id: str, what: str) -> Slot:
    """A slot of ``slots`` for a request on ``thread_id``; 429 if the cap is reached."""
    try:
        return slots.take(thread_id)
    except Full as full:
        where = "this device" if full.scope == "gateway" else f"thread {thread_id}"
        code = "too_many_streams" if what == "streams" else "too_many_runs"
        raise busy(code, f"{where} already serves {full.cap} {what} at once, its cap: try "
                   "again in a few seconds") from None


async def holding(slots: Slots, thread_id: str, what: str,
                  answer: Callable[[], Awaitable[Response]]) -> Response:
    """``answer()`` while holding a slot of ``slots``, released once it was sent."""
    slot = take(slots, thread_id, what)
    try:
        response = await answer()
    except BaseException:
        slot.release()
        raise
    return Holding(response, slot)


# -- routes ---------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """Turn ApiError and the sync core's errors into JSON answers."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except EdgebundleError as exc:
            return api_error(exc).response()

    return wrapped


def _resume_from(request: Request) -> str | None:
    """The event id a client resumes after (``Last-Event-ID`` or ``?after=``), checked."""
    after = request.headers.get("last-event-id") or request.query_params.get("after")
    if after is not None and not EVENT_ID.fullmatch(after):
        raise _bad(f"invalid event id {after!r}: resume with the id of an event you got "
                   "(such as 1712345678901-0)")
    return after


def _sse(event_type: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _events(sync: ThreadSync, thread_id: str, run_id: str,
            after: str | None) -> AsyncGenerator[RunEvent, None]:
    # SyncService.events is an async generator: close it when the client goes away.
    return cast("AsyncGenerator[RunEvent, None]", sync.events(thread_id, run_id, after))


async def _relay(sync: ThreadSync, thread_id: str, run_id: str,
                 after: str | None) -> AsyncIterator[str]:
    """The run's events as SSE, replay then live, until ``done``."""
    try:
        async with aclosing(_events(sync, thread_id, run_id, after)) as events:
            async for event in events:
                yield _sse(event.type, event.data, event.id)
    except EdgebundleError as exc:  # the thread expired or Redis went away mid-stream
        error = api_error(exc)
        yield _sse("error", {"error": error.code, "message": error.message})


async def _last_run(sync: ThreadSync, thread_id: str, run_id: str) -> Run:
    """Wait for the run's end (through its events), then the run object."""
    async with aclosing(_events(sync, thread_id, run_id, None)) as events:
        async for _ in events:
            pass
    return await sync.get_run(thread_id, run_id)


async def _turn(runner: RunGenerator, thread_id: str, parsed: RunRequest,
                after: str | None) -> Response:
    """Start the turn; its run's events as SSE, or the ended run with stream false."""
    sync = runner.sync
    ticket, opening = await start_turn(runner, thread_id, parsed)
    run_id = ticket.run.id
    # A retry gets the run it started, never a second one (Stripe's header says so).
    headers = {"Idempotent-Replayed": "true"} if ticket.again else {}
    if not parsed.stream:
        run = await _last_run(sync, thread_id, run_id)
        return JSONResponse(run.to_json(), headers=headers)

    async def stream() -> AsyncIterator[str]:
        if after is None:  # a client resuming after an event id had the opening
            yield _sse("sync", opening.to_json())
        async for chunk in _relay(sync, thread_id, run_id, after):
            yield chunk

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **headers})


async def _watch(sync: ThreadSync, thread_id: str, epoch: str | None,
                 since: int) -> Response:
    """The watch stream: a sync event now, one per change, keep-alives in between."""
    changes = cast("AsyncGenerator[SyncState, None]", sync.watch(thread_id, epoch, since))
    first = await anext(changes)  # an unknown thread is a 404, not an empty stream

    async def stream() -> AsyncIterator[str]:
        yield _sse("sync", first.to_json())
        step: asyncio.Future[SyncState] | None = None
        try:
            while True:
                # One pending step, waited on in slices: cancelling a generator's step
                # would end the generator, so the keep-alive must not time it out.
                step = asyncio.ensure_future(anext(changes))
                while not (await asyncio.wait({step}, timeout=WATCH_KEEPALIVE))[0]:
                    yield ": keep-alive\n\n"  # proxies close silent streams
                yield _sse("sync", step.result().to_json())
        except EdgebundleError as exc:
            error = api_error(exc)
            yield _sse("error", {"error": error.code, "message": error.message})
        finally:  # the client went away (or the thread did): stop polling Redis
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            await changes.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def sync_routes(sync: ThreadSync, chat: ChatService, device_id: str,
                generator: RunGenerator | None = None) -> list[Route]:
    """The routes of the sync API for this device (``device_id`` generates its runs;
    the caps are ``generator``'s limits)."""
    runner = generator or RunGenerator(sync, chat)
    limits = runner.limits
    streams = Slots(limits.max_streams, limits.streams_per_thread)  # readers (limits)

    async def create_thread(request: Request) -> Response:
        body = await _body(request, optional=True)
        thread_id = body.get("id")
        if thread_id is not None:
            thread_id = _id("thread", thread_id, "id")
        state = await sync.create_thread(thread_id)
        return JSONResponse(state.to_json(), status_code=201)

    async def get_thread(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        epoch = _epoch(request.query_params.get("epoch"))
        state = await sync.sync(thread_id, epoch, _since_query(request))
        return JSONResponse(state.to_json())

    async def watch_thread(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        epoch = _epoch(request.query_params.get("epoch"))
        since = _since_query(request)
        return await holding(streams, thread_id, "streams",
                             lambda: _watch(sync, thread_id, epoch, since))

    async def push(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        body = await _body(request)
        reseed = body.get("reseed", False)
        if not isinstance(reseed, bool):
            raise _bad("reseed must be a boolean")
        epoch = _epoch(body.get("epoch"))
        if epoch is None and not reseed:
            raise _bad("epoch is missing: send the epoch of your last sync (or reseed: true)")
        device = _id("device", body.get("device_id"), "device_id")
        since = _int(body, "since", 0)
        mutations = _mutations(body.get("mutations"), limits)
        puts = sum(1 for item in mutations if item["op"] == "put")
        if puts:
            check_thread_room(limits, thread_id, await sync.size(thread_id), puts)
        state = await sync.push(thread_id, device, epoch or "", since, mutations, reseed=reseed)
        return JSONResponse(state.to_json())

    async def start_run(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        after = _resume_from(request)
        parsed = parse_run_request(await _body(request), device_id,
                                   request.headers.get("idempotency-key"))
        return await holding(runner.turns, thread_id, "turns",
                             lambda: _turn(runner, thread_id, parsed, after))

    async def get_run(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        run = await sync.get_run(thread_id, _id("run", request.path_params["run_id"], "run id"))
        return JSONResponse(run.to_json())

    async def run_events(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        run_id = _id("run", request.path_params["run_id"], "run id")
        after = _resume_from(request)

        async def answer() -> Response:
            await sync.get_run(thread_id, run_id)  # an unknown run is a 404, not an empty stream
            return StreamingResponse(_relay(sync, thread_id, run_id, after),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        return await holding(streams, thread_id, "streams", answer)

    async def cancel_run(request: Request) -> Response:
        thread_id = _id("thread", request.path_params["thread_id"], "thread id")
        run_id = _id("run", request.path_params["run_id"], "run id")
        body = await _body(request, optional=True)
        seen = body.get("content_seen")
        if seen is not None and not isinstance(seen, str):
            raise _bad("content_seen must be a string (the text the user saw)")
        device = _id("device", body.get("device_id", device_id), "device_id")
        run = await sync.cancel_run(thread_id, run_id, device, seen)
        return JSONResponse(run.to_json())

    base = "/v1/threads/{thread_id}"
    return [
        Route("/v1/threads", _guarded(create_thread), methods=["POST"]),
        Route(base, _guarded(get_thread), methods=["GET"]),
        Route(f"{base}/watch", _guarded(watch_thread), methods=["GET"]),
        Route(f"{base}/push", _guarded(push), methods=["POST"]),
        Route(f"{base}/runs", _guarded(start_run), methods=["POST"]),
        Route(f"{base}/runs/{{run_id}}", _guarded(get_run), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/events", _guarded(run_events), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/cancel", _guarded(cancel_run), methods=["POST"]),
    ]
