"""A device under test (a real `edgebundle run` child with sync) and an SSE reader.

Shared by the tests that drive devices over HTTP: :class:`Device` wraps a
:class:`~tests.support.serving.RunProcess` with an httpx client (and the API key,
if any), :func:`read_sse` parses a streamed response's events and
:func:`completion_chunks` those of a streamed chat completion.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis as redis_py

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.sse import DONE, iter_events
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess

ENDLESS = "Looping forever"  # then "forever" again and again, until a limit stops it


class Device:
    def __init__(self, run: RunProcess, device_id: str, api_key: str | None = None) -> None:
        self.run = run
        self.id = device_id
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=run.base_url, timeout=30, headers=headers)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw)

    def run_turn(self, thread: str, content: str, **body: Any) -> list[dict[str, Any]]:
        payload = {"device_id": self.id, "input": {"content": content}, **body}
        with self.http.stream("POST", f"/v1/threads/{thread}/runs", json=payload) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            return list(read_sse(response))


def read_sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The SSE events of ``response`` (:func:`edgebundle.sse.iter_events`) as
    {"id", "event", "data"} each, "id" only on an event that has its own."""
    for event in iter_events(response):
        yield {**({"id": event.id} if event.id is not None else {}),
               "event": event.type, "data": event.data}


def completion_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` data of a streamed chat completion, which must
    end in ``[DONE]`` (:data:`edgebundle.sse.DONE`, left off)."""
    *chunks, last = [event.data for event in iter_events(response)]
    assert last == DONE, f"the stream ended without [DONE]: {last}"
    return chunks


def messages_of(device: Device, thread_id: str) -> list[dict[str, Any]]:
    """The thread's messages as ``device`` reads them, in order."""
    response = device.http.get(f"/v1/threads/{thread_id}")
    assert response.status_code == 200, response.text
    return sorted(response.json()["messages"], key=lambda m: m["position"])


def prompt_tokens(device: Device, messages: list[dict[str, Any]]) -> int:
    """What the device's model counts for these messages, asked directly."""
    direct = device.post("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": m["role"], "content": m["content"]} for m in messages]})
    assert direct.status_code == 200, direct.text
    return int(direct.json()["usage"]["prompt_tokens"])


def new_thread(device: Device) -> dict[str, Any]:
    response = device.post("/v1/threads", {})
    assert response.status_code == 201, response.text
    return dict(response.json())


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e["event"] == "message.delta")


def endless_model(directory: Path, context_length: int = 4096) -> Path:
    """The scripted model that says ENDLESS, then "forever" again and again until
    max_tokens, a full context or a stop (real llama.cpp inference, ~2 ms a token)."""
    return write_scripted_model(directory / "endless.gguf", ScriptedModelSpec(
        reply=ENDLESS, end_token=None, context_length=context_length))


@contextmanager
def serving(runs: Sequence[RunProcess]) -> Iterator[list[RunProcess]]:
    """The started ``runs`` once each serves (healthz 200); each must stop with exit 0
    afterwards, and is killed if the test failed first."""
    try:
        for run in runs:
            run.read_line()
        for run in runs:
            run.wait_healthy()
        yield list(runs)
        for run in runs:
            assert run.stop() == 0, run.stderr()
    finally:
        for run in runs:
            run.close()


@contextmanager
def sync_devices(redis_url: str | Sequence[str], model: Path, homes: Sequence[Path], *,
                 api_key: str | None = None, template: str = "llama-3-chat",
                 ids: Sequence[str] | None = None,
                 extra_args: Sequence[str] = (),
                 device_args: Sequence[Sequence[str]] | None = None,
                 env: Mapping[str, str] | None = None) -> Iterator[list[Device]]:
    """One healthy ``edgebundle run`` device per home (ids ``ids``, default dev0, dev1 …)
    on ``redis_url`` (or each on its own URL of a list), embedded runtime, with
    ``extra_args``, its own ``device_args`` and the environment ``env`` (settings such
    as EDGEBUNDLE_MAX_STREAMS); each must stop with exit 0 afterwards."""
    names = list(ids) if ids is not None else [f"dev{index}" for index in range(len(homes))]
    own = list(device_args) if device_args is not None else [()] * len(homes)
    urls = [redis_url] * len(homes) if isinstance(redis_url, str) else list(redis_url)
    env = {**(env or {}), **({"EDGEBUNDLE_API_KEY": api_key} if api_key else {})}
    runs = [RunProcess(["--runtime", "embedded", "--no-preflight", "--model", str(model),
                        "--template", template, "--redis-url", url,
                        "--device-id", name, *extra_args, *args], home=home, env=env)
            for name, home, args, url in zip(names, homes, own, urls, strict=True)]  # fmt: skip
    with serving(runs):
        yield [Device(run, name, api_key) for name, run in zip(names, runs, strict=True)]


def local_store(device: Device) -> redis_py.Redis:
    """The device's private local store (its URL from the file `run`'s note names: the
    note itself redacts the password)."""
    where = re.search(r"local store for offline use: .*its URL with the password: (\S+)\)",
                      device.run.stderr())
    assert where, device.run.stderr()
    url = Path(where.group(1)).read_text().strip()
    return redis_py.Redis.from_url(url, decode_responses=True)


def mirrored(device: Device, central: RedisServer, thread: str) -> bool:
    """The device's copy of ``thread`` is at the central version (it can serve it offline)."""
    with local_store(device) as mine, redis_py.Redis.from_url(central.url) as theirs:
        have = mine.hget(f"eb:{{{thread}}}:replica", "central_version")
        return have is not None and int(have) == int(
            theirs.hget(f"eb:{{{thread}}}:meta", "version") or -1)
