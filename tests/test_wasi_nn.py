"""The wasi_ephemeral_nn host functions, called directly as a guest would call them.

The guest's linear memory is a bytearray (edgebundle's BytesMemory); inference is
real llama.cpp on scripted GGUF models generated here. These cover what the
edgechat guest never calls (compute, reverse prompt, n-predict, small buffers).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import llama_cpp
import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.runtime.embedded import ggml
from edgebundle.runtime.embedded.preload import Preload, parse_preload
from edgebundle.runtime.embedded.wasi_nn import BytesMemory, WasiNn
from tests.support.guest import llama3_prompt

REPLY = "Certainly, this tiny model answers quickly."
TALK_REPLY = "Fine, thanks."
TALK_AFTER = "Human: another question follows"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nn-models")
    return {
        "chat": write_scripted_model(root / "chat.gguf", ScriptedModelSpec(reply=REPLY)),
        "talk": write_scripted_model(root / "talk.gguf", ScriptedModelSpec(
            reply=TALK_REPLY, eot_is_special=False, after_end=TALK_AFTER)),
    }


class Guest:
    """Calls the host functions with pointers into a bytearray 'linear memory'."""

    def __init__(self, preloads: list[Preload]) -> None:
        self.log = io.StringIO()
        self.nn = WasiNn(preloads, log=self.log)
        self.mem = BytesMemory(bytearray(1 << 20))
        self.top = 64

    def put(self, data: bytes) -> int:
        ptr = self.top
        self.mem.write(ptr, data)
        self.top += (len(data) + 7) // 8 * 8 + 8
        return ptr

    def u32(self, ptr: int) -> int:
        value: int = struct.unpack("<I", self.mem.read(ptr, 4))[0]
        return value

    def load(self, name: str, config: str | None = None) -> tuple[int, int]:
        out = self.put(bytes(4))
        raw = name.encode()
        if config is None:
            errno = self.nn.load_by_name(self.mem, self.put(raw), len(raw), out)
        else:
            errno = self.nn.load_by_name_with_config(self.mem, self.put(raw), len(raw),
                                                     self.put(config.encode()), len(config), out)
        return errno, self.u32(out)

    def context(self, name: str = "default", config: str | None = None) -> int:
        errno, graph = self.load(name, config)
        assert errno == 0, self.log.getvalue()
        out = self.put(bytes(4))
        assert self.nn.init_execution_context(self.mem, graph, out) == 0
        return self.u32(out)

    def set_input(self, ctx: int, index: int, data: bytes, kind: int = 3) -> int:
        dims = self.put(struct.pack("<I", 1))
        tensor = self.put(struct.pack("<IIB3xII", dims, 1, kind, self.put(data), len(data)))
        return self.nn.set_input(self.mem, ctx, index, tensor)

    def output(self, ctx: int, index: int, cap: int = 4096,
               single: bool = False) -> tuple[int, bytes, int]:
        buf, written = self.put(bytes(cap)), self.put(bytes(4))
        fetch = self.nn.get_output_single if single else self.nn.get_output
        errno = fetch(self.mem, ctx, index, buf, cap, written)
        size = self.u32(written)
        return errno, self.mem.read(buf, min(size, cap)) if errno == 0 else b"", size

    def generate(self, ctx: int, prompt: bytes, metadata: dict[str, object] | None = None) -> int:
        if metadata is not None:
            assert self.set_input(ctx, 1, json.dumps(metadata).encode()) == 0
        assert self.set_input(ctx, 0, prompt) == 0
        return self.nn.compute(ctx)


@pytest.fixture
def chat(models: dict[str, Path]) -> Guest:
    return Guest([Preload("default", "ggml", "auto", str(models["chat"]))])


@pytest.fixture
def talk(models: dict[str, Path]) -> Guest:
    return Guest([Preload("default", "ggml", "auto", str(models["talk"]))])


def test_compute_includes_the_eog_piece(chat: Guest) -> None:
    ctx = chat.context()
    assert chat.generate(ctx, llama3_prompt("hello")) == 0  # end-of-sequence mapped to success
    errno, text, size = chat.output(ctx, 0)
    assert (errno, text) == (0, (REPLY + "<|eot_id|>").encode()) and size == len(text)
    errno, info, _ = chat.output(ctx, 1)
    n_out = len(REPLY.split()) + 1
    assert info == (b'{"input_tokens": %d, "output_tokens": %d, "llama_build_number": 0, '
                    b'"llama_commit": "unknown"}' % (json.loads(info)["input_tokens"], n_out))


def test_compute_honours_n_predict_but_compute_single_does_not(chat: Guest) -> None:
    ctx = chat.context()
    assert chat.generate(ctx, llama3_prompt("hello"), {"n-predict": 2}) == 0
    assert chat.output(ctx, 0)[1] == b"Certainly, this"
    assert chat.set_input(ctx, 0, llama3_prompt("again")) == 0
    pieces = []
    while (errno := chat.nn.compute_single(ctx)) == 0:
        pieces.append(chat.output(ctx, 0, single=True)[1])
    assert errno == 100 and b"".join(pieces) == REPLY.encode()
    assert chat.nn.fini_single(ctx) == 0


def test_reverse_prompt_stops_a_model_that_talks_to_itself(talk: Guest) -> None:
    ctx = talk.context()
    assert talk.generate(ctx, llama3_prompt("hi")) == 0
    assert talk.output(ctx, 0)[1].decode() == \
        f"{TALK_REPLY}<|eot_id|>{TALK_AFTER}<|end_of_text|>"
    assert talk.generate(ctx, llama3_prompt("hi"), {"reverse-prompt": "<|eot_id|>"}) == 0
    assert talk.output(ctx, 0)[1].decode() == f"{TALK_REPLY}<|eot_id|>"


def test_compute_single_ignores_the_reverse_prompt(talk: Guest) -> None:
    ctx = talk.context()
    assert talk.set_input(ctx, 1, b'{"reverse-prompt": "<|eot_id|>"}') == 0
    assert talk.set_input(ctx, 0, llama3_prompt("hi")) == 0
    text = b""
    while talk.nn.compute_single(ctx) == 0:
        text += talk.output(ctx, 0, single=True)[1]
    assert text.decode() == f"{TALK_REPLY}<|eot_id|>{TALK_AFTER}"


def test_small_output_buffer_answers_7_with_the_needed_size(chat: Guest) -> None:
    ctx = chat.context()
    assert chat.generate(ctx, llama3_prompt("hello")) == 0
    need = len(REPLY) + len("<|eot_id|>")
    assert chat.output(ctx, 0, cap=8) == (7, b"", need)
    assert chat.output(ctx, 0, cap=need)[0] == 0
    assert chat.output(ctx, 1, cap=4)[0] == 7
    assert f"GGML backend: output buffer too small, need {need} bytes but got 8." \
        in chat.log.getvalue()


def test_invalid_metadata_json_is_2_and_a_wrong_type_is_1(chat: Guest) -> None:
    ctx = chat.context()
    assert chat.set_input(ctx, 1, b"{not json") == 2
    assert chat.set_input(ctx, 1, b'{"ctx-size": "big"}') == 1
    assert chat.set_input(ctx, 1, b'{"some-future-key": 1, "temp": -3}') == 0  # ignored, clamped
    context = chat.nn.contexts[ctx]
    assert context is not None
    assert context.graph.settings.sampling.temp == 0.0
    assert "[error] [WASI-NN] GGML backend: setInput: failed to parse metadata." \
        in chat.log.getvalue()


def test_a_python_exception_becomes_errno_5(chat: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = chat.context()
    assert chat.set_input(ctx, 0, llama3_prompt("hello")) == 0

    def broken(self: ggml.ExecutionContext) -> int:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(ggml.ExecutionContext, "compute_single", broken)
    assert chat.nn.compute_single(ctx) == 5
    assert "GGML backend: compute_single: unexpected RuntimeError: simulated bug" \
        in chat.log.getvalue()


def test_prompt_too_long_follows_ctx_size_from_the_load_config(chat: Guest) -> None:
    ctx = chat.context(config='{"ctx-size": 256}')
    context = chat.nn.contexts[ctx]
    assert context is not None
    assert context.graph.n_ctx == 256
    assert chat.generate(ctx, llama3_prompt("x" * 300)) == 102
    assert "compute: the prompt is too long." in chat.log.getvalue()


def test_names_load_once_unknown_is_8_missing_file_is_103(tmp_path: Path, chat: Guest) -> None:
    first, second = chat.load("default"), chat.load("default")
    assert first == second == (0, 0)
    assert chat.load("nope")[0] == 8
    guest = Guest([Preload("gone", "ggml", "auto", str(tmp_path / "gone.gguf"))])
    assert guest.load("gone")[0] == 103
    assert "load: model file not found." in guest.log.getvalue()


def test_load_with_a_preload_builder_and_encodings(chat: Guest, models: dict[str, Path]) -> None:
    raw = f"preload:{models['chat']}".encode()
    builders = chat.put(struct.pack("<II", chat.put(raw), len(raw)))
    out = chat.put(bytes(4))
    assert chat.nn.load(chat.mem, builders, 1, 0, 0, out) == 2  # OpenVINO: not here
    assert chat.nn.load(chat.mem, builders, 1, 6, 3, out) == 0  # GGML, AUTO
    graph = chat.u32(out)
    ctx_out = chat.put(bytes(4))
    assert chat.nn.init_execution_context(chat.mem, graph, ctx_out) == 0
    ctx = chat.u32(ctx_out)
    assert chat.generate(ctx, llama3_prompt("hey")) == 0
    assert chat.nn.finalize_execution_context(ctx) == 0
    assert chat.nn.compute(ctx) == 1
    assert chat.nn.unload(graph) == 0
    assert chat.nn.init_execution_context(chat.mem, graph, ctx_out) == 1


def test_bad_pointers_and_tensor_types_are_invalid_arguments(chat: Guest) -> None:
    ctx = chat.context()
    assert chat.nn.set_input(chat.mem, ctx, 0, (1 << 20) - 4) == 1
    assert chat.set_input(ctx, 0, b"hi", kind=9) == 1
    assert chat.nn.compute(ctx) == 1  # no input yet
    assert chat.nn.compute(99) == 1


def test_preload_flag_is_parsed_like_the_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_preload("default:ggml:auto:/m/a:b.gguf") == \
        Preload("default", "ggml", "auto", "/m/a:b.gguf")
    assert parse_preload("x:GGML:CPU:m.gguf").target == "cpu"
    assert capsys.readouterr().out == ""
    # as the plugin (wasinnenv.cpp): an unknown backend or device is logged on stdout
    # and skipped; a known backend is kept (its load fails); missing fields are empty
    for unknown in ("x:nosuchnet:cpu:m.xml", "x:ggml:npu:m.gguf", "m.gguf"):
        assert parse_preload(unknown) is None
        assert "[error] [WASI-NN] Preload Model's Backend or Device is Not Support." \
            in capsys.readouterr().out
    assert parse_preload("x:OpenVINO:CPU:m.xml") == Preload("x", "openvino", "cpu", "m.xml")
    assert parse_preload("x:ggml:auto") == Preload("x", "ggml", "auto", "")


@pytest.mark.parametrize("metadata", [
    {"mirostat": 2}, {"mirostat": 1}, {"dry-multipier": 0.8}, {"temp": 0},
    {"top-k": 1, "top-p": 0.5, "min-p": 0.2, "typ-p": 0.9, "seed": 42, "repeat-penalty": 1.1},
])
def test_sampler_options_build_working_chains(chat: Guest, metadata: dict[str, object]) -> None:
    ctx = chat.context()
    assert chat.generate(ctx, llama3_prompt("hello"), metadata) == 0, chat.log.getvalue()
    assert chat.output(ctx, 0)[1] == (REPLY + "<|eot_id|>").encode()


def test_grammar_and_json_schema_constrain_compute(chat: Guest) -> None:
    ctx = chat.context()
    assert chat.generate(ctx, llama3_prompt("hello"), {"grammar": 'root ::= "Certainly,"'}) == 0
    text = chat.output(ctx, 0)[1]
    # then only an end-of-generation token may follow (which one is up to the sampler)
    assert text.startswith(b"Certainly,")
    assert text.removeprefix(b"Certainly,") in (b"<|eot_id|>", b"<|end_of_text|>", b"</s>")
    schema = json.dumps({"type": "string"})
    assert chat.generate(ctx, llama3_prompt("hello"), {"grammar": "", "json-schema": schema,
                                                       "n-predict": 3}) == 0
    assert chat.output(ctx, 0)[1].startswith(b'"')
    assert chat.set_input(ctx, 1, b'{"json-schema": "{not a schema"}') == 1


def test_threads_take_effect_at_load_only_as_in_the_plugin(chat: Guest) -> None:
    """GGML/core/ggml_core.cpp builds the llama context once, at load, with threads for
    both generation and prompt batches; a request's metadata threads change nothing
    (a guest that sends them only per request runs 4 threads on genuine WasmEdge)."""
    ctx = chat.context(config='{"ctx-size": 256, "threads": 1, "threads-batch": 3}')
    graph = chat.nn.graphs[0]
    assert graph is not None
    assert (llama_cpp.llama_n_threads(graph.ctx), llama_cpp.llama_n_threads_batch(graph.ctx)) \
        == (1, 1)
    assert chat.generate(ctx, llama3_prompt("hello"), {"threads": 2, "threads-batch": 2}) == 0
    assert (llama_cpp.llama_n_threads(graph.ctx), llama_cpp.llama_n_threads_batch(graph.ctx)) \
        == (1, 1)


def test_with_no_threads_anywhere_the_plugin_default_of_4_runs(chat: Guest) -> None:
    chat.context(config='{"ctx-size": 256}')
    graph = chat.nn.graphs[0]
    assert graph is not None and llama_cpp.llama_n_threads(graph.ctx) == 4


def _prompt_tokens_evaluated(graph: ggml.Graph) -> int:
    """llama.cpp's own count of prompt tokens evaluated since the last reset."""
    return int(llama_cpp.llama_perf_context(graph.ctx).n_p_eval)


def test_a_prompt_evaluates_only_what_follows_the_prefix_the_context_holds(
        chat: Guest, models: dict[str, Path]) -> None:
    """Unlike the plugin (which clears the KV cache at every set_input and compute), the
    graph keeps it: a thread's next turn evaluates its new message, not the history,
    and answers exactly what a fresh graph answers."""
    ctx = chat.context()
    graph = chat.nn.graphs[0]
    assert graph is not None
    first = llama3_prompt("hello")
    assert chat.generate(ctx, first) == 0
    reply = chat.output(ctx, 0)[1]
    follow_up = (first + reply + b"<|start_header_id|>user<|end_header_id|>\n\nand then?"
                 b"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # The scripted tokenizer spells the reply's text in other tokens than it generated,
    # so what is shared is the first prompt (a real vocabulary shares the reply too).
    history, whole = len(graph.tokenize(first)), len(graph.tokenize(follow_up))

    def evaluated(prompt: bytes, context: int = ctx) -> tuple[int, bytes, bytes]:
        llama_cpp.llama_perf_context_reset(graph.ctx)
        assert chat.generate(context, prompt) == 0
        return (_prompt_tokens_evaluated(graph), chat.output(context, 0)[1],
                chat.output(context, 1)[1])

    fresh = Guest([Preload("default", "ggml", "auto", str(models["chat"]))])
    fresh_ctx = fresh.context()
    assert fresh.generate(fresh_ctx, follow_up) == 0
    expected = (fresh.output(fresh_ctx, 0)[1], fresh.output(fresh_ctx, 1)[1])

    count, text, info = evaluated(follow_up)
    assert (text, info) == expected
    assert 0 < count <= whole - history
    assert evaluated(follow_up)[:2] == (1, expected[0])  # the same prompt: its last token
    other = llama3_prompt("something else entirely")
    held, wanted = list(graph.tokenize(follow_up)), list(graph.tokenize(other))
    shared = next(i for i, (a, b) in enumerate(zip(held, wanted, strict=False)) if a != b)
    assert 0 < shared < 20  # the template's opening
    assert evaluated(other)[0] == len(wanted) - shared
    # Another execution context of the graph moved its KV cache: still exact.
    second = chat.context()
    assert evaluated(first, second)[1] == reply
    count, text, info = evaluated(follow_up)
    assert (text, info) == expected and count <= whole - history


def test_compute_single_returns_a_token_before_evaluating_it(chat: Guest) -> None:
    """The first piece reaches the guest one evaluation sooner; a guest that stops after
    a token never pays for evaluating it (the plugin evaluates before returning)."""
    ctx = chat.context()
    graph = chat.nn.graphs[0]
    assert graph is not None
    assert chat.set_input(ctx, 0, llama3_prompt("hello")) == 0
    assert chat.nn.compute_single(ctx) == 0
    prompt = len(graph.cached)
    assert chat.output(ctx, 0, single=True)[1] == REPLY.split()[0].encode()
    llama_cpp.llama_perf_context_reset(graph.ctx)
    assert chat.nn.compute_single(ctx) == 0  # evaluates the first, samples the second
    assert (len(graph.cached), llama_cpp.llama_perf_context(graph.ctx).n_eval) == (prompt + 1, 1)
    assert chat.nn.fini_single(ctx) == 0
    assert len(graph.cached) == prompt + 1  # the second was never evaluated
