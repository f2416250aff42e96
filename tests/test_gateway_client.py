"""GatewayClient and the shared SSE reader against a stand-in gateway (httpx.MockTransport):
what each answer of the gateway becomes for a caller. The real gateway is driven
through them by test_terminal_chat.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from edgebundle import sse
from edgebundle.errors import GatewayError
from edgebundle.gateway_client import Dropped, EpochMoved, GatewayClient, Gone

SERVER = "http://gateway.test"
STATE = {"id": "t1", "epoch": "e1", "version": 3, "full": True, "messages": [],
         "active_run": None, "queued_runs": []}


def _stream(*events: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": sse.MEDIA_TYPE},
                          content="".join(events).encode())


def _with(handler: Callable[[httpx.Request], httpx.Response],
          use: Callable[[GatewayClient], Any]) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient(base_url=SERVER,
                                     transport=httpx.MockTransport(handler)) as http:
            return await use(GatewayClient(http, SERVER))
    return asyncio.run(main())


def test_events_carry_their_own_id_and_resume_sends_last_event_id() -> None:
    seen: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _stream(sse.encode({"x": 1}, "run.queued", "1-0"), ": keep-alive\n\n",
                       sse.encode({"x": 2}, "message.delta", "2-0"), sse.encode({}, "done"))

    async def use(client: GatewayClient) -> list[sse.Event]:
        async with client.run_events("t1", "r1", after="0-5") as events:
            return [event async for event in events]

    events = _with(gateway, use)
    assert [(e.id, e.type, e.data) for e in events] == [
        ("1-0", "run.queued", {"x": 1}), ("2-0", "message.delta", {"x": 2}), (None, "done", {})]
    assert seen[0].url.path == "/v1/threads/t1/runs/r1/events"
    assert seen[0].headers["last-event-id"] == "0-5"


def test_the_reader_gives_openai_done_as_is_and_every_other_data_as_json() -> None:
    """A chat-completion stream (an OpenAI peer's too: CRLF, a ping comment) ends in
    ``[DONE]``, the one payload that is not JSON."""
    response = _stream('data: {"choices":[]}\r\n\r\n', ": ping\r\n\r\n",
                       sse.frame(sse.DONE))
    assert [e.data for e in sse.iter_events(response)] == [{"choices": []}, sse.DONE]


@pytest.mark.parametrize(("answer", "raised"), [
    (httpx.Response(503, json={"error": "redis_unavailable", "message": "down"}), Dropped),
    (httpx.Response(409, json={"error": "epoch_mismatch"}), EpochMoved),
    (httpx.Response(401, json={"error": "unauthorized"}), GatewayError),
    (_stream(sse.encode({"error": "redis_unavailable", "message": "lost"}, "error")), Dropped),
])
def test_each_answer_of_a_turn_is_what_a_caller_acts_on(answer: httpx.Response,
                                                        raised: type[Exception]) -> None:
    async def use(client: GatewayClient) -> None:
        async with client.start_run("t1", {"device_id": "d"}) as events:
            async for _ in events:
                pass

    with pytest.raises(raised):
        _with(lambda request: answer, use)


def test_a_thread_gone_from_the_watch_is_gone_and_join_names_an_unreachable_gateway() -> None:
    async def watch(client: GatewayClient) -> None:
        async with client.watch("t1", "e1", 3):
            pass

    with pytest.raises(Gone, match="no such thread"):
        _with(lambda request: httpx.Response(404, json={"message": "no such thread"}), watch)

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(GatewayError, match=f"cannot reach the gateway at {SERVER}"):
        _with(unreachable, lambda client: client.join("t1"))
    joined = _with(lambda request: httpx.Response(201, json=STATE), lambda c: c.join(None))
    assert (joined.id, joined.epoch) == ("t1", "e1")


def test_sync_link_is_none_when_healthz_has_no_sync_or_fails() -> None:
    link = {"link": "offline", "pending": 2}
    assert _with(lambda r: httpx.Response(200, json={"sync": link}),
                 lambda c: c.sync_link()) == link
    assert _with(lambda r: httpx.Response(200, json={}), lambda c: c.sync_link()) is None
    assert _with(lambda r: httpx.Response(503, text="x"), lambda c: c.sync_link()) is None


def test_a_200_that_is_no_event_stream_is_refused_for_good() -> None:
    async def use(client: GatewayClient) -> None:
        async with client.run_events("t1", "r1") as events:
            async for _ in events:
                pass

    with pytest.raises(GatewayError, match="did not answer with an event stream"):
        _with(lambda request: httpx.Response(200, text="<html>"), use)
