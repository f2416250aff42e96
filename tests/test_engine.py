"""The engine: a supervised edgechat guest on the embedded runtime, one request at a time.

No doubles: the committed wasm/edgechat.wasm runs under ``python -m edgebundle exec``
(started by the real supervisor in pipe mode) with real llama.cpp inference on
scripted GGUF models generated here, whose greedy reply is exact.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edgebundle.config import load_settings
from edgebundle.demo_model import ScriptedModelSpec, pieces_for, write_scripted_model
from edgebundle.engine import Delta, End, Engine
from edgebundle.errors import SupervisorError
from edgebundle.runtime.launch import LaunchSpec
from edgebundle.runtime.supervisor import Backoff
from edgebundle.serving import launch_spec
from tests.support.guest import llama3_prompt
from tests.support.processes import gone
from tests.support.serving import LoopThread, wait_for

REPLY = "Certainly, the engine streams this scripted sentence word by word."
ENDLESS = "Looping forever"  # then "forever" again and again, until a limit stops it
FAST = Backoff(initial=0.05, factor=2.0, maximum=1.0)


def spec_for(home: Path, model: Path) -> LaunchSpec:
    settings = load_settings({"home": str(home), "model": str(model), "runtime": "embedded"})
    return launch_spec(settings, environ={})


def prompt(text: str = "Hello") -> str:
    return llama3_prompt(text).decode()


async def collect(engine: Engine, text: str = "Hello", max_tokens: int = 0,
                  metadata: dict[str, object] | None = None) -> tuple[list[str], End]:
    pieces: list[str] = []
    async for event in engine.generate(prompt(text), metadata or {}, max_tokens):
        if isinstance(event, Delta):
            pieces.append(event.text)
        else:
            return pieces, event
    raise AssertionError("no End")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "chat": write_scripted_model(root / "chat.gguf", ScriptedModelSpec(reply=REPLY)),
        # 4096 tokens of context at ~2 ms a token: seconds of generation to interrupt.
        "endless": write_scripted_model(root / "endless.gguf", ScriptedModelSpec(
            reply=ENDLESS, end_token=None, context_length=4096)),
        "short": write_scripted_model(root / "short.gguf", ScriptedModelSpec(
            reply=REPLY, context_length=32)),
    }  # fmt: skip


@pytest.fixture(scope="module")
def chat(loop: LoopThread, models: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    home = tmp_path_factory.mktemp("home")
    engine = Engine(spec_for(home, models["chat"]), log_path=home / "logs" / "chat.log")
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="module")
def endless(loop: LoopThread, models: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    home = tmp_path_factory.mktemp("home")
    engine = Engine(spec_for(home, models["endless"]), log_path=home / "logs" / "endless.log",
                    backoff=FAST)
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


def test_scripted_reply_streams_exactly(loop: LoopThread, chat: Engine) -> None:
    assert chat.ready and chat.pid is not None
    pieces, end = loop.run(collect(chat))
    assert "".join(pieces) == REPLY
    assert len(pieces) == len(pieces_for(REPLY))  # one delta per generated word
    assert end.reason == "eos"
    assert end.input_tokens > 10 and end.output_tokens == len(pieces) + 1  # + the EOG token


def test_max_tokens_ends_with_length(loop: LoopThread, chat: Engine) -> None:
    pieces, end = loop.run(collect(chat, max_tokens=2))
    assert "".join(pieces) == "Certainly, the"
    assert (end.reason, end.output_tokens) == ("length", 2)


def test_requests_are_served_one_at_a_time_in_order(loop: LoopThread, chat: Engine) -> None:
    order: list[tuple[int, str]] = []

    async def one(number: int, max_tokens: int) -> End:
        async for event in chat.generate(prompt(), {}, max_tokens):
            order.append((number, "delta" if isinstance(event, Delta) else "end"))
            if isinstance(event, End):
                return event
        raise AssertionError("no End")

    async def together() -> list[End]:
        tasks = [asyncio.create_task(one(n, m)) for n, m in ((1, 0), (2, 3), (3, 0))]
        return list(await asyncio.gather(*tasks))

    ends = loop.run(together())
    assert [e.reason for e in ends] == ["eos", "length", "eos"]
    numbers = [n for n, _ in order]
    assert numbers == sorted(numbers)  # no interleaving, first come first served
    assert [kind for n, kind in order if n == 2] == ["delta"] * 3 + ["end"]


def test_a_killed_guest_fails_its_request_and_the_next_one_works(
    loop: LoopThread, endless: Engine
) -> None:
    """kill -9 of the pid the supervisor started, mid-request."""
    victim = endless.pid
    assert victim is not None

    async def killed_midway() -> tuple[list[str], End]:
        pieces: list[str] = []
        async for event in endless.generate(prompt(), {}, 0):
            if isinstance(event, Delta):
                pieces.append(event.text)
                if len(pieces) == 3:
                    os.kill(victim, signal.SIGKILL)
            else:
                return pieces, event
        raise AssertionError("no End")

    pieces, end = loop.run(killed_midway())
    assert end.reason == "error"
    assert "killed by SIGKILL" in end.detail
    assert "".join(pieces).startswith(ENDLESS)  # what was streamed stays streamed
    wait_for(lambda: gone(victim))

    pieces, end = loop.run(collect(endless, max_tokens=3))  # waits for the restarted guest
    assert "".join(pieces) == "Looping forever forever" and end.reason == "length"
    assert endless.pid not in (None, victim) and endless.restarts == 1


def test_cancel_ends_the_running_request(loop: LoopThread, endless: Engine) -> None:
    async def cancelled() -> tuple[list[str], End, float]:
        pieces: list[str] = []
        async for event in endless.generate(prompt(), {}, 0):
            if isinstance(event, Delta):
                pieces.append(event.text)
                if len(pieces) == 3:
                    started = time.monotonic()
                    await endless.cancel()
            else:
                return pieces, event, time.monotonic() - started
        raise AssertionError("no End")

    pieces, end, took = loop.run(cancelled())
    assert end.reason == "cancelled"
    assert took < 2.0  # a full run to the context's end takes several seconds
    # the next request starts clean
    pieces, end = loop.run(collect(endless, max_tokens=2))
    assert "".join(pieces) == "Looping forever" and end.reason == "length"


def test_a_consumer_that_leaves_does_not_disturb_the_next_request(
    loop: LoopThread, endless: Engine
) -> None:
    async def leave_early() -> None:
        stream = endless.generate(prompt(), {}, 0)
        async for event in stream:
            assert isinstance(event, Delta)
            break
        await stream.aclose()

    loop.run(leave_early())
    started = time.monotonic()
    pieces, end = loop.run(collect(endless, max_tokens=2))
    assert "".join(pieces) == "Looping forever" and end.reason == "length"
    assert time.monotonic() - started < 3.0  # the abandoned request was stopped, not waited out


def test_prompt_too_long(loop: LoopThread, models: dict[str, Path], tmp_path: Path) -> None:
    engine = Engine(spec_for(tmp_path, models["short"]), log_path=tmp_path / "short.log")

    async def run() -> tuple[list[str], End]:
        await engine.start()
        try:
            return await collect(engine, "word " * 40)
        finally:
            await engine.stop()

    pieces, end = loop.run(run())
    assert pieces == [] and end.reason == "prompt_too_long"
    assert end.input_tokens > 32


def test_runtime_log_lines_on_stdout_never_break_the_protocol(
        loop: LoopThread, models: dict[str, Path], tmp_path: Path) -> None:
    """Requests the plugin refuses make it log on the guest's stdout, as genuine WasmEdge
    does (a prompt too long, bad metadata, a seed out of range): each ends with its own
    reason, the same guest serves the next request, and ten times the restart limit of
    such requests never makes the supervisor give up. The lines land in the guest's log."""
    engine = Engine(spec_for(tmp_path, models["short"]), log_path=tmp_path / "short.log")

    async def run() -> list[End]:
        await engine.start()
        pid = engine.pid
        ends = []
        try:
            for _ in range(12):
                for text, metadata in (("word " * 40, {}), ("Hi", {"seed": 2**64 - 1}),
                                       ("Hi", {"seed": 2**70}), ("Hi", {"temp": "hot"})):
                    _, end = await collect(engine, text, metadata=metadata)
                    ends.append(end)
            pieces, end = await collect(engine, "Hi", max_tokens=3)
            assert "".join(pieces) == "Certainly, the engine" and end.reason == "length"
            assert engine.pid == pid and engine.restarts == 0
            return ends
        finally:
            await engine.stop()

    ends = loop.run(run())
    assert {(e.reason, e.errno) for e in ends} == {
        ("prompt_too_long", 102), ("error", 1), ("error", 2)}
    log = (tmp_path / "short.log").read_text()
    assert log.count("runtime: [") >= 48
    assert "[error] [WASI-NN] GGML backend: " in log


def test_a_guest_that_cannot_load_its_model_fails_start(
    loop: LoopThread, models: dict[str, Path], tmp_path: Path
) -> None:
    spec = spec_for(tmp_path, models["chat"])
    missing = tmp_path / "gone.gguf"
    argv = tuple(a.replace(str(models["chat"]), str(missing)) for a in spec.argv)
    engine = Engine(replace(spec, argv=argv), log_path=tmp_path / "fatal.log", backoff=FAST)
    with pytest.raises(SupervisorError, match=r"could not load its model: the model file .*"
                                              r"does not exist \(WASI-NN errno 103\)"):
        loop.run(engine.start())
    assert engine.pid is None
    assert "FATAL 103" in (tmp_path / "fatal.log").read_text()
