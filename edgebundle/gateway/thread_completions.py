"""Chat completions that are turns of a synced thread: ``"thread_id"`` in the body of
``POST /v1/chat/completions`` (the extension of docs/api.md).

What it means, so that any OpenAI client (stateless by nature) can take part in a
conversation that several devices share:

- The LAST message of the request must be a ``user`` message: it is the run's input,
  the new turn. It lands in the thread like the input of ``POST …/runs``.
- The prompt is rendered from the synced thread, not from the request: the thread's
  history wins, because every device renders the same prompt from it. For a thread
  that exists, the request's earlier messages are ignored.
- A thread that does not exist yet is created with that id and seeded with the
  request's earlier messages (system messages left out: the device's own system
  prompt applies), in one atomic step (a push with ``reseed``), so a stateless
  client works from its first call. If another client creates the thread at the same
  moment, its history wins and the seed is dropped.
- The run is started with the ``enqueue`` policy (a busy thread makes it wait its
  turn) and generated on this device exactly as ``POST /v1/threads/{id}/runs`` does
  (:func:`~edgebundle.turns.start_turn`): other devices can watch or join
  it, and its text is stored in the thread. It is started on the thread as it is now
  (``CURRENT_EPOCH``: no sync round trip first), and its text reaches this request
  through the run's tap (:class:`~edgebundle.turns.RunTap`), not a round trip through
  its stream; a retry, and a run another device ended, are read from the stream.
- The answer is OpenAI's: a ``chat.completion`` with ``usage``, or with ``stream``
  ``chat.completion.chunk`` events ending in ``[DONE]`` (the usage chunk with
  ``stream_options.include_usage``), produced by the same code as without a thread.
  Its ``usage`` has one more field, the run's ``dropped_messages``: how many older
  messages of the thread the prompt left out to fit the context (the device's
  ``context_policy``, :mod:`edgebundle.context_window`).
- Retries are harmless: ``input_id`` in the body (the id of the turn's input message)
  or an ``Idempotency-Key`` header names the turn, and a request naming a turn that
  was already started answers with that run (from its start) instead of a second one.
- A streaming client that goes away cancels the run; the thread keeps exactly the
  text that was sent to it (what the user saw is what the model sees next). A request
  that named its turn (``input_id`` or ``Idempotency-Key``) said it will come back:
  its run goes on, and the retry gets it.
- Errors are OpenAI error objects: ``thread_id`` on a device without sync, an invalid
  id or a last message that is not the user's: 400. A turn whose input does not fit
  the context even without the thread's older messages (with ``context_policy``
  ``fail``: a thread that no longer fits): 400 ``context_length_exceeded``; any other
  failed run: 500
  ``server_error`` (in a stream: an error chunk, then ``[DONE]``), as without a
  thread. Errors of the sync store keep their status (409, 503 …) with the sync API's
  error code as ``code``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any, cast

from redis.exceptions import RedisError as RedisPyError

from edgebundle.completion import Finished, TextDelta, Usage
from edgebundle.errors import (
    EdgebundleError,
    EpochMismatchError,
    ThreadFullError,
)
from edgebundle.gateway.api_errors import api_error, redis_unavailable
from edgebundle.gateway.openai_api import BadRequest, ChatRequest
from edgebundle.sync.backend import new_id
from edgebundle.sync.runs import CURRENT_EPOCH
from edgebundle.sync.service import RunEvent
from edgebundle.templates import Message
from edgebundle.turns import (
    TOO_LONG,
    RunGenerator,
    RunRequest,
    RunTap,
    StartedTurn,
    check_content,
    idempotent_input_id,
    start_turn,
)

# Who the seeding push is made as. Mutation ids are kept per device and thread, so the
# seed must not use a real device's id: that device's own first pushes (mid 1, 2 …)
# would then be taken for repeats and skipped.
SEED_DEVICE = "chat-completions-seed"
_ENDS = ("run.completed", "run.failed", "run.cancelled")


class ThreadChat:
    """Chat completions as turns of synced threads, generated on this device."""

    def __init__(self, runner: RunGenerator, device_id: str) -> None:
        self.runner = runner
        self.sync = runner.sync
        self.device_id = device_id
        self._cancels: set[asyncio.Task[None]] = set()

    async def complete(self, request: ChatRequest, idempotency_key: str | None = None,
                       ) -> AsyncGenerator[TextDelta | Finished, None]:
        """The reply to ``request`` (which has a ``thread_id``), as the chat's events.

        Raises (at the first event, before anything is written) BadRequest for a
        request that cannot be a turn, ApiError for an error of the sync store.
        """
        thread_id = request.thread_id
        assert thread_id is not None
        where = f"messages[{len(request.messages) - 1}]"
        last = request.messages[-1]
        if last.role != "user":
            raise BadRequest("with thread_id the last message must be the user's new message "
                             f"(role user), not {last.role}", f"{where}.role")
        if not last.content.strip():
            raise BadRequest("with thread_id the last message is the new turn and it is "
                             "empty: send the user's message", f"{where}.content")
        try:
            self._check_sizes(request.messages)
            input_id = idempotent_input_id(request.input_id, idempotency_key)
            turn = RunRequest(device_id=self.device_id, epoch=CURRENT_EPOCH, since=0,
                              content=last.content, input_id=input_id, multitask="enqueue",
                              params=request.params, stream=request.stream)
            started = await self._start(thread_id, turn, request.messages[:-1])
        except EdgebundleError as exc:
            raise api_error(exc) from None
        except (RedisPyError, OSError) as exc:
            raise redis_unavailable(exc) from None

        run_id = started.ticket.run.id
        sent: list[str] = []
        ended = False
        try:
            async with aclosing(self._followed(thread_id, run_id, started.tap)) as events:
                async for event in events:
                    if isinstance(event, str):
                        sent.append(event)
                        yield TextDelta(event)
                    else:
                        ended = True
                        yield _finished(event)
                        return
        except EdgebundleError as exc:  # the thread expired or Redis went away meanwhile
            ended = True
            yield Finished("error", Usage(), api_error(exc).message)
        finally:
            if not ended and input_id is None:  # the client went away mid-reply for good
                self._cancel_later(thread_id, run_id, "".join(sent))

    async def _start(self, thread_id: str, turn: RunRequest,
                     earlier: Sequence[Message]) -> StartedTurn:
        """Start the turn, tapped; a missing thread is created first, seeded with
        ``earlier``."""
        try:
            return await start_turn(self.runner, thread_id, turn, tap=True)
        except EpochMismatchError as exc:
            if exc.epoch is not None:
                raise
        await self._seed(thread_id, earlier)
        return await start_turn(self.runner, thread_id, turn, tap=True)

    async def _followed(self, thread_id: str, run_id: str, tap: RunTap | None
                        ) -> AsyncGenerator[str | RunEvent, None]:
        """The run's text pieces, then its terminal event: from the tap while there is
        one, then from the run's stream, whose text is skipped as far as the tap gave it
        (a run another device generated gives the tap nothing, all of it is read)."""
        tapped = 0
        while tap is not None:
            item = await tap.next()
            if isinstance(item, str):
                tapped += len(item)
                yield item
                continue
            if item is not None:
                yield item
                return
            break
        events = cast("AsyncGenerator[RunEvent, None]", self.sync.events(thread_id, run_id))
        async with aclosing(events):
            async for event in events:
                if event.type == "message.delta":
                    text: str = event.data["text"]
                    skipped = min(tapped, len(text))
                    tapped -= skipped
                    if text[skipped:]:
                        yield text[skipped:]
                elif event.type in _ENDS:
                    yield event
                    return

    def _check_sizes(self, messages: Sequence[Message]) -> None:
        """The caps on what may land in the thread (edgebundle.limits): each
        message (the earlier ones may seed it) and how many; a LimitError before any write."""
        limits = self.runner.limits
        for index, message in enumerate(messages):
            check_content(limits, message.content, f"messages[{index}].content")
        if len(messages) + 1 > limits.max_thread_messages:  # the seed, the input, the reply
            raise ThreadFullError(f"{len(messages)} messages would seed a thread of "
                                  f"{limits.max_thread_messages} messages at most "
                                  "(max_thread_messages): send fewer")

    async def _seed(self, thread_id: str, earlier: Sequence[Message]) -> None:
        """Create the thread, seeded with ``earlier`` (system messages left out)."""
        seed = [m for m in earlier if m.role != "system"]
        mutations = [{"mid": mid, "op": "put",
                      "message": {"id": new_id("msg"), "role": m.role, "content": m.content}}
                     for mid, m in enumerate(seed, 1)]  # fmt: skip
        with contextlib.suppress(EpochMismatchError):  # created by someone else meanwhile:
            await self.sync.push(thread_id, SEED_DEVICE, "", 0, mutations, reseed=True)

    def _cancel_later(self, thread_id: str, run_id: str, content_seen: str) -> None:
        """Cancel the run in a task of its own: the request's task is being cancelled."""

        async def cancel() -> None:
            with contextlib.suppress(EdgebundleError, RedisPyError, OSError):
                await self.sync.cancel_run(thread_id, run_id, self.device_id, content_seen)

        task = asyncio.get_running_loop().create_task(cancel())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)


def _finished(event: RunEvent) -> Finished:
    """A run's terminal event as the chat's Finished."""
    data: dict[str, Any] = event.data
    if event.type == "run.completed":
        usage = data.get("usage") or {}
        return Finished(data.get("reason") or "eos",
                        Usage(int(usage.get("input_tokens", 0)),
                              int(usage.get("output_tokens", 0)),
                              int(usage.get("dropped_messages", 0))))
    if event.type == "run.failed":
        error = str(data.get("error") or "the run failed")
        if TOO_LONG in error:
            return Finished("prompt_too_long", Usage(), error)
        return Finished("error", Usage(), error)
    return Finished("cancelled", Usage())  # stopped by another client, or an edit
