"""The HTTP gateway of `edgebundle run`: routes, API key, validation, streaming, cancel.

One real `python -m edgebundle run` child for the module (embedded runtime, real
guest, real llama.cpp) serving a scripted model that never ends its turn by itself:
"Looping forever forever …" until max_tokens or the 4096-token context stops it
(several seconds), so a cancelled generation is told apart from a finished one.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.sse import DONE, iter_events
from tests.support.devices import completion_chunks
from tests.support.serving import RunProcess, healthy_run

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunProcess]:
    root = tmp_path_factory.mktemp("gateway")
    model = write_scripted_model(root / "endless.gguf", ScriptedModelSpec(
        reply="Looping forever", end_token=None, context_length=4096))  # fmt: skip
    with healthy_run(["--runtime", "embedded", "--no-preflight", "--model", str(model)],
                     home=root / "home", env={"EDGEBUNDLE_API_KEY": KEY}) as run:
        yield run


def chat(server: RunProcess, body: Any, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=30)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    message: str = error["message"]
    return message


def test_healthz_needs_no_key_and_names_model_and_runtime(server: RunProcess) -> None:
    response = server.healthz()
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "endless", "runtime": "embedded"}


def test_every_other_route_needs_the_key(server: RunProcess) -> None:
    models = f"{server.base_url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(models, headers=headers)
        assert_error(response, 401)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert_error(chat(server, {"messages": HELLO, "max_tokens": 1}, headers={}), 401)
    response = httpx.get(models, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": [
        {"id": "endless", "object": "model", "created": 0, "owned_by": "edgebundle"}]}


@pytest.mark.parametrize(("body", "param", "says"), [
    ({}, "messages", "messages must be a non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "only text parts"),
    ({"messages": HELLO, "temperature": 5}, "temperature", "between 0 and 2"),
    ({"messages": HELLO, "top_p": "high"}, "top_p", "must be a number"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"messages": HELLO, "max_tokens": True}, "max_tokens", "an integer"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"messages": HELLO, "stream": "yes"}, "stream", "a boolean"),
    ({"messages": HELLO, "n": 2}, "n", "n=1"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "messages", "must end with a user message"),
    ([1, 2], None, "JSON object"),
])  # fmt: skip
def test_bad_payloads_are_400_and_change_nothing(
    server: RunProcess, body: Any, param: str | None, says: str
) -> None:
    assert says in assert_error(chat(server, body), 400, param)
    response = chat(server, {"messages": HELLO, "max_tokens": 3})
    assert response.json()["choices"][0]["message"]["content"] == "Looping forever forever"


def test_a_body_that_is_not_json_is_400(server: RunProcess) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{nope",
                          headers={**AUTH, "Content-Type": "application/json"})
    assert "not valid JSON" in assert_error(response, 400)


def test_non_stream_completion_shape(server: RunProcess) -> None:
    response = chat(server, {
        "model": "endless", "max_completion_tokens": 4, "temperature": 0, "seed": 7,
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    })  # fmt: skip
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "endless" and isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Looping forever forever forever"
    assert choice["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4 and usage["prompt_tokens"] > 10


def test_stream_sends_role_deltas_finish_usage_and_done(server: RunProcess) -> None:
    body = {"messages": HELLO, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = completion_chunks(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert contents == ["Looping", " forever", " forever"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])


def test_a_client_that_disconnects_mid_stream_cancels_the_generation(
    server: RunProcess,
) -> None:
    body = {"messages": HELLO, "stream": True}  # no limit: seconds of generation
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=30) as response:
        received = 0
        for event in iter_events(response):
            if "content" in event.data["choices"][0]["delta"]:  # the role's "" too
                received += 1
                if received == 5:
                    break  # and leave: the connection closes
    started = time.monotonic()
    response = chat(server, {"messages": HELLO, "max_tokens": 2})
    assert response.json()["choices"][0]["message"]["content"] == "Looping forever"
    # the abandoned generation was stopped, not run to the end of its 4096-token context
    assert time.monotonic() - started < 3.0


def test_a_prompt_too_long_for_the_context_is_400(server: RunProcess) -> None:
    words = "word " * 5000
    response = chat(server, {"messages": [{"role": "user", "content": words}]})
    assert "more than the model's context allows" in assert_error(response, 400, "messages")
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_the_guest_log_holds_one_start(server: RunProcess, tmp_path: Path) -> None:
    """Everything above ran on one guest process: the model loaded once."""
    log = server.stderr_path.parent / "logs" / "edgechat.log"
    assert log.read_text().count("edgebundle: started pid ") == 1


def test_a_guest_killed_mid_stream_ends_it_with_an_error_then_serving_resumes(
    server: RunProcess,
) -> None:
    """kill -9 of the guest pid the supervisor started (from its log), mid-stream."""
    log = server.stderr_path.parent / "logs" / "edgechat.log"
    [guest] = [int(line.split("started pid ")[1].split(":")[0])
               for line in log.read_text().splitlines() if "edgebundle: started pid " in line]
    body = {"messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=30) as response:
        events: list[Any] = []
        for event in iter_events(response):
            events.append(event.data)
            if len(events) == 4:
                os.kill(guest, signal.SIGKILL)
    assert events[-1] == DONE
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "killed by SIGKILL" in error["message"]
    contents = [e["choices"][0]["delta"].get("content") for e in events[1:4]]
    assert contents == ["Looping", " forever", " forever"]  # what was sent stays sent

    server.wait_healthy()  # the supervisor restarted the guest
    response = chat(server, {"messages": HELLO, "max_tokens": 2})
    assert response.json()["choices"][0]["message"]["content"] == "Looping forever"
