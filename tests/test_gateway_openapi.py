"""``GET /openapi.json``: the spec covers every route, every spec path is served, and the
API fuzzed from the served spec never answers 5xx.

Real parts only: a real redis-server child and one `python -m edgebundle run` device
with sync and an API key (embedded runtime, real llama.cpp on a scripted tiny model
that answers a short fixed reply). The app's own route table comes from
:func:`create_app` built in-process over real (unstarted) parts.

The fuzzer (schemathesis, driven by the served spec) skips one route, with reason:
``GET /v1/threads/{thread_id}/watch`` streams until the client leaves, so a request
for a thread that exists never completes; its 404 and 400 answers are checked by
hand below instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from edgebundle.completion import ChatService, chat_setup
from edgebundle.config import load_settings
from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.engine import Engine
from edgebundle.gateway.app import GatewayState, create_app
from edgebundle.gateway.openapi import build_spec
from edgebundle.serving import launch_spec
from edgebundle.sync.service import SyncService
from tests.support.devices import Device, sync_devices
from tests.support.redis_server import RedisServer

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}  # what the gateway parses (else a 415)
REPLY = "A short fuzzed reply."
WATCH = "/v1/threads/{thread_id}/watch"
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scripted_model(tmp_path_factory.mktemp("models") / "short.gguf",
                                ScriptedModelSpec(reply=REPLY, context_length=1024))


@pytest.fixture(scope="module")
def device(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        with sync_devices(redis.url, model, [tmp_path_factory.mktemp("home")],
                          api_key=KEY) as [started]:
            yield started
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def spec(device: Device) -> dict[str, Any]:
    assert httpx.get(f"{device.run.base_url}/openapi.json", timeout=10).status_code == 401
    response = device.http.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def app_routes(model: Path, home: Path) -> set[tuple[str, str]]:
    """(path, method) of every route of the app `run` serves with sync on and a key."""
    config = load_settings({"home": str(home), "model": str(model), "runtime": "embedded"})
    launch = launch_spec(config, environ={})
    setup = chat_setup(config, launch)
    engine = Engine(launch, log_path=home / "unused.log")  # never started: routes only
    chat = ChatService(engine, setup.template, setup.model_info)
    sync = SyncService(aioredis.Redis())  # connects lazily: never, here
    app = create_app(GatewayState(engine=engine, chat=chat, model_id="short", runtime="embedded",
                                  sync=sync, device_id="dev0"), api_key=KEY)
    served = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        served |= {(route.path, method) for method in (route.methods or ()) if method in METHODS}
    return served


def test_every_route_of_the_app_is_in_the_spec_and_nothing_else(
    spec: dict[str, Any], model: Path, tmp_path: Path,
) -> None:
    assert spec["openapi"].startswith("3.1")
    described = {(path, method.upper()) for path, operations in spec["paths"].items()
                 for method in operations}
    assert described == app_routes(model, tmp_path)
    assert {"/metrics", "/healthz", WATCH, "/v1/chat/completions"} <= set(spec["paths"])
    # The documented details the clients rely on.
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    body = spec["components"]["schemas"]["ChatBody"]
    assert "thread_id" in body["properties"] and body["required"] == ["messages"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"}
    sync_error = spec["paths"]["/v1/threads/{thread_id}/push"]["post"]["responses"]["409"]
    assert sync_error["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SyncError"}
    assert set(spec["paths"][WATCH]["get"]["responses"]["200"]["content"]) == {
        "text/event-stream"}
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_every_spec_path_is_served(spec: dict[str, Any], device: Device) -> None:
    """Each operation reaches its handler: never the router's own 404 or 405."""
    for path, operations in spec["paths"].items():
        url = re.sub(r"\{[a-z_]+\}", "never-made", path)
        for method in operations:
            response = device.http.request(method.upper(), url,
                                           json={} if method == "post" else None)
            assert response.status_code != 405, (method, path)
            assert not (response.status_code == 404 and response.text == "Not Found"), path
            if response.status_code == 404:  # the handler's: a thread that does not exist
                assert response.json()["error"] == "thread_not_found", (path, response.text)


def test_watch_answers_404_and_400_without_a_stream(device: Device) -> None:
    gone = device.http.get("/v1/threads/never-made/watch")
    assert gone.status_code == 404 and gone.json()["error"] == "thread_not_found"
    bad = device.http.get("/v1/threads/never-made/watch", params={"since": "soon"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"


def test_what_the_fuzzer_found_is_a_400_and_does_not_upset_the_next_request(
    device: Device,
) -> None:
    """Once 500s: a max_tokens over the guest's u32 desynchronised the guest (every later
    request failed), and a lone surrogate in a JSON string could not be encoded."""
    hello = [{"role": "user", "content": "hi"}]
    for body in ({"messages": hello, "max_tokens": 2**40},
                 {"messages": hello, "max_completion_tokens": 2**31}):
        answer = device.post("/v1/chat/completions", body)
        assert answer.status_code == 400 and "max_tokens" in answer.json()["error"]["message"]
    lone = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    answer = device.http.post("/v1/chat/completions", content=lone, headers=JSON)
    assert answer.status_code == 400 and "surrogate" in answer.json()["error"]["message"]
    assert device.post("/v1/threads", {"id": "lone"}).status_code == 201
    for path in ("/v1/threads/lone/runs", "/v1/threads/lone/runs/run-x/cancel"):
        answer = device.http.post(path, content=b'{"input": {"content": "\\udfff"}}',
                                  headers=JSON)
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_json")
    big = device.post("/v1/threads/lone/runs", {"input": {"content": "x"}, "stream": False,
                                                "params": {"max_tokens": 2**32}})
    assert big.status_code == 400 and "params.max_tokens" in big.json()["message"]
    reply = device.post("/v1/chat/completions", {"messages": hello})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == REPLY


@pytest.fixture(scope="module")
def api_schema(device: Device) -> Any:
    schema = schemathesis.openapi.from_url(f"{device.run.base_url}/openapi.json",
                                           headers=AUTH, timeout=30)
    schema.config.update(base_url=device.run.base_url)
    return schema


# (method, path) of every operation to fuzz: all but the watch stream (module docstring).
SPEC = build_spec("short", sync=True, api_key=True)
FUZZED = [(method.upper(), path) for path, operations in SPEC["paths"].items()
          for method in operations if path != WATCH]
# Only operations that take input can be sent invalid input.
TAKES_INPUT = {(method.upper(), path) for path, operations in SPEC["paths"].items()
               for method, operation in operations.items()
               if operation.get("parameters") or operation.get("requestBody")}
# Positive cases must be answered as the spec says; any case, valid or not, without a 5xx.
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=lambda mode: mode.value)
@pytest.mark.parametrize(("method", "path"), FUZZED, ids=[f"{m} {p}" for m, p in FUZZED])
def test_fuzzed_requests_never_get_a_5xx_and_answers_match_the_spec(
    api_schema: Any, method: str, path: str, mode: GenerationMode,
) -> None:
    if mode is GenerationMode.NEGATIVE and (method, path) not in TAKES_INPUT:
        return  # no input to get wrong: the positive run covers it
    operation = api_schema[path][method]
    checks = [not_a_server_error, *(CONFORMANCE if mode is GenerationMode.POSITIVE else [])]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # a real device is slow on purpose
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers=AUTH, timeout=60, checks=checks)

    fuzz()
