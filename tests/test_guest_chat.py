"""The committed edgechat guest on the embedded runtime, end to end.

Every test runs ``python -m edgebundle exec --nn-preload … wasm/edgechat.wasm`` as a
child process (inherited stdio, as a supervisor starts it) with real llama.cpp
inference on scripted GGUF models generated here, whose greedy reply is exact.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgebundle.demo_model import ScriptedModelSpec, pieces_for, write_scripted_model
from edgebundle.guest_protocol import STOP_LINE, Delta, EndReason, Fatal, Ready, encode_request
from tests.support.guest import GuestProcess, exec_argv, llama3_prompt

REPLY = "Sure, here comes exactly one scripted answer for you."
TALK_REPLY = "Fine, thanks."
TALK_AFTER = "Human: another question follows"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "chat": write_scripted_model(root / "chat.gguf", ScriptedModelSpec(reply=REPLY)),
        "talk": write_scripted_model(root / "talk.gguf", ScriptedModelSpec(
            reply=TALK_REPLY, eot_is_special=False, after_end=TALK_AFTER)),
        "endless": write_scripted_model(root / "endless.gguf", ScriptedModelSpec(
            reply="Looping forever", end_token=None)),
    }


def start(tmp_path: Path, model: Path | str, *args: str, alias: str = "default") -> GuestProcess:
    return GuestProcess(exec_argv(model, *args, alias=alias), tmp_path / "guest.stderr")


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory,
         models: dict[str, Path]) -> Iterator[GuestProcess]:
    """One guest serving many requests, as in production."""
    guest = start(tmp_path_factory.mktemp("chat"), models["chat"])
    assert guest.start() == Ready(0, 0)
    yield guest
    guest.kill()


def test_scripted_reply_streams_piece_by_piece(chat: GuestProcess) -> None:
    pieces, end = chat.request(llama3_prompt("Hello there"))
    assert b"".join(pieces).decode() == REPLY
    # one D event per generated token: the reply's pieces, exactly
    assert [p.decode() for p in pieces] == [p.replace("\u2581", " ") for p in pieces_for(REPLY)]
    assert end.reason == EndReason.EOS and end.errno == 100
    assert b"<|eot_id|>" not in b"".join(pieces)  # compute_single: the EOG piece is not fetched
    assert end.info["input_tokens"] > 10
    assert end.info["output_tokens"] == len(pieces) + 1  # the EOG token was sampled
    assert set(end.info) == {"input_tokens", "output_tokens", "llama_build_number", "llama_commit"}


def test_max_tokens_ends_with_length(chat: GuestProcess) -> None:
    pieces, end = chat.request(llama3_prompt("Hello"), max_tokens=3)
    assert len(pieces) == 3
    assert b"".join(pieces) == b"Sure, here comes"
    assert (end.reason, end.errno) == (EndReason.LENGTH, 0)


def test_metadata_goes_through_untouched(chat: GuestProcess) -> None:
    """ignore-eos only the plugin understands: the model runs on past its end token."""
    pieces, end = chat.request(llama3_prompt("Hi"), json.dumps({"ignore-eos": True}).encode(),
                               max_tokens=len(pieces_for(REPLY)) + 3)
    text = b"".join(pieces).decode()
    assert text.startswith(REPLY + "<|eot_id|><|end_of_text|>")
    assert end.reason == EndReason.LENGTH
    # and the next request is back to normal
    pieces, end = chat.request(llama3_prompt("Hi"), b'{"ignore-eos": false}')
    assert b"".join(pieces).decode() == REPLY and end.reason == EndReason.EOS


def test_invalid_metadata_and_bad_header_keep_the_guest_serving(chat: GuestProcess) -> None:
    pieces, end = chat.request(llama3_prompt("Hi"), b"{not json")
    assert (pieces, end.reason, end.errno) == ([], EndReason.ERROR, 2)
    chat.send(b"HELLO guest\n")
    pieces, end = chat.collect()
    assert (pieces, end.reason, end.errno, end.info) == ([], EndReason.ERROR, 1, {})
    pieces, end = chat.request(llama3_prompt("Still there?"))
    assert b"".join(pieces).decode() == REPLY
    logged = "\n".join(chat.foreign)  # on stdout, between the guest's lines, as genuine
    assert "[error] [WASI-NN] GGML backend: setInput: failed to parse metadata." in logged


def test_prompt_is_binary_safe(chat: GuestProcess) -> None:
    prompt = llama3_prompt("@").replace(b"@", b"line one\nline two\x00\xff\xfe end")
    pieces, end = chat.request(prompt)
    assert b"".join(pieces).decode() == REPLY and end.reason == EndReason.EOS


def test_many_requests_one_process_model_loaded_once(tmp_path: Path,
                                                     models: dict[str, Path]) -> None:
    copy = tmp_path / "model.gguf"
    copy.write_bytes(models["chat"].read_bytes())
    guest = start(tmp_path, copy)
    try:
        assert isinstance(guest.start(), Ready)
        copy.unlink()  # loaded once at READY: later requests never reopen the file
        for n in range(3):
            pieces, end = guest.request(llama3_prompt(f"Question {n}"))
            assert b"".join(pieces).decode() == REPLY and end.reason == EndReason.EOS
        assert guest.close() == 0  # EOF on stdin ends the guest cleanly
    finally:
        guest.kill()


def test_prompt_too_long_and_context_full_at_the_plugin_limits(tmp_path: Path,
                                                               models: dict[str, Path]) -> None:
    """ctx 256: a prompt of 252 (= 256 - 4) tokens runs until the context is full after 4
    tokens; one token more is "prompt too long" before anything is generated."""
    guest = start(tmp_path, models["chat"], "--config", '{"ctx-size": 256}')
    try:
        assert isinstance(guest.start(), Ready)
        _, end = guest.request(llama3_prompt(""), max_tokens=1)
        base = end.info["input_tokens"]  # every extra "x" is one byte token
        pieces, end = guest.request(llama3_prompt("x" * (252 - base)))
        assert end.info["input_tokens"] == 252
        assert (end.reason, end.errno) == (EndReason.CONTEXT_FULL, 101)
        assert b"".join(pieces) == b"Sure, here comes exactly"  # 4 tokens fit
        pieces, end = guest.request(llama3_prompt("x" * (253 - base)))
        assert (pieces, end.reason, end.errno) == ([], EndReason.PROMPT_TOO_LONG, 102)
        assert end.info["input_tokens"] == 253
        assert "the prompt is too long. Your input has 253 tokens. Please reduce it to 252" \
            in "\n".join(guest.foreign)  # on stdout, between the guest's lines, as genuine
        pieces, end = guest.request(llama3_prompt("short again"))
        assert b"".join(pieces).decode() == REPLY
    finally:
        guest.kill()


def test_long_generation_with_small_context_ends_context_full(tmp_path: Path,
                                                              models: dict[str, Path]) -> None:
    guest = start(tmp_path, models["endless"], "--config", '{"ctx-size": 256}')
    try:
        assert isinstance(guest.start(), Ready)
        pieces, end = guest.request(llama3_prompt("Go"))
        assert (end.reason, end.errno) == (EndReason.CONTEXT_FULL, 101)
        assert len(pieces) == 256 - end.info["input_tokens"]
        assert b"".join(pieces).startswith(b"Looping forever forever forever")
    finally:
        guest.kill()


def test_unknown_alias_is_fatal_8(tmp_path: Path, models: dict[str, Path]) -> None:
    guest = start(tmp_path, models["chat"], "--model-alias", "other")
    try:
        event = guest.start()
        assert isinstance(event, Fatal) and event.errno == 8
        assert "other" in event.message
        assert guest.close() == 1
    finally:
        guest.kill()


def test_missing_model_file_is_fatal_103_at_load(tmp_path: Path) -> None:
    guest = start(tmp_path, tmp_path / "nowhere.gguf")
    try:
        event = guest.start()
        assert isinstance(event, Fatal) and event.errno == 103
        assert guest.close() == 1
        logged = "\n".join(guest.foreign)
        assert "[error] [WASI-NN] GGML backend: load: model file not found." in logged
    finally:
        guest.kill()


def test_model_that_talks_to_itself_runs_past_its_turn(tmp_path: Path,
                                                       models: dict[str, Path]) -> None:
    """<|eot_id|> spelled as ordinary text is no end-of-generation token: compute_single
    streams right past it (reverse-prompt applies to compute only), so stopping at the
    template's stop strings is the orchestrator's job."""
    guest = start(tmp_path, models["talk"])
    try:
        assert isinstance(guest.start(), Ready)
        pieces, end = guest.request(llama3_prompt("Hi"), b'{"reverse-prompt": "<|eot_id|>"}')
        assert b"".join(pieces).decode() == TALK_REPLY + "<|eot_id|>" + TALK_AFTER
        assert end.reason == EndReason.EOS  # only at <|end_of_text|>
    finally:
        guest.kill()


def test_ctrl_c_ends_an_idle_guest_at_once(tmp_path: Path, models: dict[str, Path]) -> None:
    """Blocked reading stdin, the guest still dies at SIGINT, as under wasmedge."""
    guest = start(tmp_path, models["chat"])
    try:
        assert isinstance(guest.start(), Ready)
        guest.proc.send_signal(signal.SIGINT)
        assert guest.proc.wait(10) == -signal.SIGINT
    finally:
        guest.kill()


def test_stop_ends_the_running_request_and_an_idle_stop_is_ignored(
        tmp_path: Path, models: dict[str, Path]) -> None:
    """STOP between tokens ends an endless generation with reason cancelled."""
    guest = start(tmp_path, models["endless"])
    try:
        assert isinstance(guest.start(), Ready)
        guest.send(encode_request(llama3_prompt("Go"), b"", 0))
        first = [guest.next_event() for _ in range(3)]
        assert all(isinstance(e, Delta) for e in first)
        guest.send(STOP_LINE)
        pieces, end = guest.collect()
        assert end.reason == EndReason.CANCELLED
        assert len(pieces) < 200  # stopped early (54 seen under load), not at the ~500-token limit
        guest.send(STOP_LINE)  # idle: nothing to stop, nothing answered
        pieces, end = guest.request(llama3_prompt("Again"), max_tokens=4)
        assert end.reason == EndReason.LENGTH and len(pieces) == 4
    finally:
        guest.kill()
