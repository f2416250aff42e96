"""The sync API and chat completions in process: the fast tier of the gateway's tests.

What is real: the Starlette app of :func:`edgebundle.gateway.app.create_app` with its
middleware (guard, metrics), the routes, the turn core (:mod:`edgebundle.turns`), the
chat (template rendering), the sync core, and a real redis-server child. What is not:
HTTP goes through httpx's ASGITransport instead of a socket, and the engine is
:class:`tests.support.engine_double.ScriptedEngine`, a double at the Engine boundary
(:class:`edgebundle.engine.ChatEngine`) that says what the real-process tests' scripted
model says. The real-process tests (test_gateway_sync.py, test_idempotent_turns.py,
test_openai_thread.py …) stay: they cover the guest, uvicorn and two devices.

Marked ``inprocess``: tests/conftest.py runs these before everything else.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from edgebundle.completion import ChatService
from edgebundle.gateway.app import GatewayState, create_app
from edgebundle.limits import Limits
from edgebundle.sync.client import connect
from edgebundle.sync.service import SyncService
from edgebundle.templates import get_template
from edgebundle.turns import RunGenerator
from tests.support.devices import completion_chunks, read_sse
from tests.support.engine_double import ScriptedEngine
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.inprocess

REPLY_4 = "Looping forever forever forever"  # what max_tokens 4 makes the script say
DEVICE = "devA"
# The event types of a turn that starts at once, deltas left out.
TURN_EVENTS = ["sync", "run.queued", "message.created", "run.started", "message.created",
               "message.completed", "run.completed", "done"]


@dataclass
class Gateway:
    http: httpx.AsyncClient
    engine: ScriptedEngine

    async def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return await self.http.post(path, json=body, **kwargs)

    async def new_thread(self) -> dict[str, Any]:
        response = await self.post("/v1/threads", {"id": f"inp-{uuid.uuid4().hex[:12]}"})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def messages(self, thread_id: str) -> list[tuple[str, str, str]]:
        response = await self.http.get(f"/v1/threads/{thread_id}")
        assert response.status_code == 200, response.text
        ordered = sorted(response.json()["messages"], key=lambda m: m["position"])
        return [(m["role"], m["content"], m["status"]) for m in ordered]


@asynccontextmanager
async def gateway(url: str, limits: Limits | None = None) -> AsyncIterator[Gateway]:
    """The app as `edgebundle run` wires it (gateway/server.py), on the engine double."""
    redis = await connect(url)
    sync = SyncService(redis)
    engine = ScriptedEngine()
    chat = ChatService(engine, get_template("llama-3-chat"))
    runs = RunGenerator(sync, chat, "window", limits or Limits())
    state = GatewayState(engine=engine, chat=chat, model_id="scripted", runtime="double",
                         sync=sync, device_id=DEVICE, runs=runs)
    transport = httpx.ASGITransport(app=create_app(state))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080",
                                     timeout=30) as http:
            yield Gateway(http, engine)
    finally:
        await runs.close()  # as the server does: runs first, while Redis is there
        await sync.aclose()


def run_in(redis: RedisServer, body: Callable[[Gateway], Awaitable[None]],
           limits: Limits | None = None) -> None:
    async def main() -> None:
        async with gateway(redis.url, limits) as gw:
            await body(gw)

    asyncio.run(main())


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events if e["event"] != "message.delta"]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e["event"] == "message.delta")


def turn(content: str, input_id: str | None = None, *, stream: bool = True,
         max_tokens: int = 4) -> dict[str, Any]:
    given = {"content": content} if input_id is None else {"id": input_id, "content": content}
    return {"device_id": DEVICE, "input": given, "stream": stream,
            "params": {"max_tokens": max_tokens}}


class LoadingEngine(ScriptedEngine):
    """The double while its model loads: not ready until ``loaded``."""

    loaded = False

    @property
    def ready(self) -> bool:
        return self.loaded


def test_healthz_says_loading_until_the_engine_is_ready() -> None:
    """What a probe sees while the guest loads (in test_run_embedded.py the demo model is
    often loaded by the time `run` listens: the guest starts before the gateway)."""

    async def main() -> None:
        engine = LoadingEngine()
        state = GatewayState(engine=engine, chat=ChatService(engine, get_template("llama-3-chat")),
                             model_id="scripted", runtime="double")
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as http:
            first = await http.get("/healthz")
            assert (first.status_code, first.json()) == (503, {"status": "loading"})
            engine.loaded = True
            ready = await http.get("/healthz")
            assert (ready.status_code, ready.json()["status"]) == (200, "ok")

    asyncio.run(main())


def test_create_thread_then_push_then_read_it_back(redis: RedisServer) -> None:
    async def body(gw: Gateway) -> None:
        blank = await gw.post("/v1/threads", None)
        assert blank.status_code == 201, blank.text
        state = blank.json()
        assert (state["full"], state["messages"], state["active_run"]) == (True, [], None)
        bad = await gw.post("/v1/threads", {"id": "no spaces"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"

        tid = state["id"]
        put = {"mid": 1, "op": "put",
               "message": {"id": "m-1", "role": "user", "content": "hello"}}
        pushed = await gw.post(f"/v1/threads/{tid}/push", {
            "device_id": "devB", "epoch": state["epoch"], "since": 0, "mutations": [put]})
        assert pushed.status_code == 200, pushed.text
        assert await gw.messages(tid) == [("user", "hello", "completed")]
        again = await gw.post(f"/v1/threads/{tid}/push", {
            "device_id": "devB", "epoch": state["epoch"], "since": 0, "mutations": [put]})
        assert again.status_code == 200 and await gw.messages(tid) == [
            ("user", "hello", "completed")]  # a repeated mid is skipped

        no_epoch = await gw.post(f"/v1/threads/{tid}/push",
                                 {"device_id": "devB", "mutations": []})
        assert no_epoch.status_code == 400
        assert no_epoch.json() == {
            "error": "invalid_request",
            "message": "epoch is missing: send the epoch of your last sync (or reseed: true)"}
        missing = await gw.http.get("/v1/threads/inp-nothing-here")
        assert missing.status_code == 404 and missing.json()["error"] == "thread_not_found"

    run_in(redis, body)


def test_a_streamed_turn_and_a_turn_answered_whole(redis: RedisServer) -> None:
    async def body(gw: Gateway) -> None:
        thread = await gw.new_thread()
        tid = thread["id"]
        streamed = await gw.post(f"/v1/threads/{tid}/runs", turn("first question"))
        assert streamed.status_code == 200, streamed.text
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = list(read_sse(streamed))
        assert types(events) == TURN_EVENTS
        assert events[0]["data"]["full"] is True and "id" not in events[0]
        assert text_of(events) == REPLY_4
        done = events[-2]["data"]
        assert (done["reason"], done["run"]["device_id"]) == ("length", DEVICE)
        # The prompt was rendered here from the synced thread, with the template.
        assert "first question" in gw.engine.prompts[-1]
        assert "<|start_header_id|>user<|end_header_id|>" in gw.engine.prompts[-1]

        whole = await gw.post(f"/v1/threads/{tid}/runs", turn("second", stream=False,
                                                              max_tokens=2))
        assert whole.status_code == 200, whole.text
        assert (whole.json()["status"], whole.json()["reason"]) == ("completed", "length")
        assert "Idempotent-Replayed" not in whole.headers
        # The second turn's prompt holds the first turn's reply: the thread is the prompt.
        assert REPLY_4 in gw.engine.prompts[-1]
        assert await gw.messages(tid) == [
            ("user", "first question", "completed"), ("assistant", REPLY_4, "completed"),
            ("user", "second", "completed"), ("assistant", "Looping forever", "completed")]
        run = await gw.http.get(f"/v1/threads/{tid}/runs/{whole.json()['id']}")
        assert run.json()["status"] == "completed"

    run_in(redis, body)


def test_a_retried_turn_gets_its_run_by_input_id_or_idempotency_key(
    redis: RedisServer,
) -> None:
    async def body(gw: Gateway) -> None:
        tid = (await gw.new_thread())["id"]
        first = await gw.post(f"/v1/threads/{tid}/runs", turn("hi", "in-1", stream=False))
        retry = await gw.post(f"/v1/threads/{tid}/runs", turn("hi", "in-1", stream=False))
        assert first.status_code == retry.status_code == 200, retry.text
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["id"] == first.json()["id"]
        # The retry streamed: the run's events from the start, the same text.
        replay = await gw.post(f"/v1/threads/{tid}/runs", turn("hi", "in-1"))
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert text_of(list(read_sse(replay))) == REPLY_4

        keyed = {"Idempotency-Key": "order-42"}
        once = await gw.post(f"/v1/threads/{tid}/runs", turn("again", stream=False),
                             headers=keyed)
        twice = await gw.post(f"/v1/threads/{tid}/runs", turn("again", stream=False),
                              headers=keyed)
        assert twice.json()["id"] == once.json()["id"]
        assert twice.headers["Idempotent-Replayed"] == "true"
        assert len(gw.engine.prompts) == 2  # generated once each
        assert [m[1] for m in await gw.messages(tid)] == ["hi", REPLY_4, "again", REPLY_4]

        bad_key = await gw.post(f"/v1/threads/{tid}/runs", turn("x"),
                                headers={"Idempotency-Key": "a\tb"})
        assert bad_key.status_code == 400
        assert bad_key.json()["message"] == (
            "the Idempotency-Key header must be 1-255 printable ASCII characters")

    run_in(redis, body)


def test_turns_on_one_thread_queue_and_each_prompt_holds_the_turns_before(
    redis: RedisServer,
) -> None:
    async def body(gw: Gateway) -> None:
        tid = (await gw.new_thread())["id"]
        gw.engine.piece_delay = 0.02  # each turn takes long enough for the others to queue
        answers = await asyncio.gather(*(
            gw.post(f"/v1/threads/{tid}/runs", turn(f"question {n}", max_tokens=3 + n))
            for n in range(3)))
        streams = [list(read_sse(answer)) for answer in answers]
        assert all(s[-1]["event"] == "done" for s in streams)
        # Started while another run was generating: they waited in the thread's queue.
        waited = [s for s in streams if s[0]["data"]["active_run"] is not None]
        assert waited and all(s[0]["data"]["active_run"]["status"] == "in_progress"
                              for s in waited)
        assert sorted(text_of(s).count("forever") for s in streams) == [2, 3, 4]
        conversation = await gw.messages(tid)
        # One at a time, in the order they were taken: each question, then its reply.
        assert [role for role, _, _ in conversation] == ["user", "assistant"] * 3
        assert all(status == "completed" for _, _, status in conversation)
        for (_, question, _), (_, reply, _) in zip(conversation[::2], conversation[1::2],
                                                   strict=True):
            asked = int(question.split()[-1])
            assert reply.count("forever") == 2 + asked
        # The last prompt holds every earlier turn of the thread.
        last = gw.engine.prompts[-1]
        assert all(content in last for _, content, _ in conversation[:-1])

    run_in(redis, body)


def test_a_chat_completion_with_and_without_a_thread(redis: RedisServer) -> None:
    async def body(gw: Gateway) -> None:
        plain = await gw.post("/v1/chat/completions", {
            "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == "Looping forever"

        tid = f"inp-{uuid.uuid4().hex[:12]}"  # a thread that does not exist yet: seeded
        seeded = await gw.post("/v1/chat/completions", {
            "thread_id": tid, "max_tokens": 4, "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": "noted"},
                {"role": "user", "content": "now"}]})
        assert seeded.status_code == 200, seeded.text
        answer = seeded.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == REPLY_4
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["dropped_messages"] == 0
        assert await gw.messages(tid) == [
            ("user", "earlier", "completed"), ("assistant", "noted", "completed"),
            ("user", "now", "completed"), ("assistant", REPLY_4, "completed")]

        streamed = await gw.post("/v1/chat/completions", {
            "thread_id": tid, "stream": True, "max_tokens": 2,
            "messages": [{"role": "user", "content": "more"}]})
        assert streamed.status_code == 200, streamed.text
        text = "".join(c["choices"][0]["delta"].get("content", "")
                       for c in completion_chunks(streamed))
        assert text == "Looping forever"
        # The thread's history wins: the prompt held the seeded turns, not the request's.
        assert "earlier" in gw.engine.prompts[-1] and REPLY_4 in gw.engine.prompts[-1]

        last_not_user = await gw.post("/v1/chat/completions", {
            "thread_id": tid, "messages": [{"role": "assistant", "content": "x"}]})
        assert last_not_user.status_code == 400
        assert last_not_user.json()["error"]["param"] == "messages[0].role"

    run_in(redis, body)


def test_the_caps_the_turn_core_raises_keep_their_http_answers(redis: RedisServer) -> None:
    async def body(gw: Gateway) -> None:
        tid = (await gw.new_thread())["id"]
        large = await gw.post(f"/v1/threads/{tid}/runs", turn("x" * 65))
        assert large.status_code == 413
        assert large.json() == {"error": "message_too_large", "message":
                                "input.content is 65 bytes, more than 64 "
                                "(max_message_bytes): shorten it"}
        done = await gw.post(f"/v1/threads/{tid}/runs", turn("one", stream=False))
        assert done.status_code == 200, done.text
        full = await gw.post(f"/v1/threads/{tid}/runs", turn("two"))
        assert full.status_code == 409 and full.json()["error"] == "thread_full"
        assert full.json()["message"].startswith(f"thread {tid} holds 2 messages, 3 at most")
        completion = await gw.post("/v1/chat/completions", {
            "thread_id": tid, "messages": [{"role": "user", "content": "y" * 65}]})
        assert completion.status_code == 413
        assert completion.json()["error"]["code"] == "message_too_large"

    run_in(redis, body, Limits(max_message_bytes=64, max_thread_messages=3))
