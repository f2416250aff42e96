"""Benchmark: the chat guest on the embedded runtime vs llama-cpp-python direct.

Prints one JSON object per line (docs/api.md "Benchmarks"):

- ``runtime.tokens_per_s_ratio``: generation speed of wasm/edgechat.wasm under
  ``edgebundle exec`` (child process, measured on the protocol's D events as the
  orchestrator receives them) divided by llama-cpp-python's ``Llama.generate`` in this
  process, on the same generated model, same tokens, same threads, same sampling
  defaults. Goal >= 0.95.
- ``runtime.guest_tokens_per_s`` / ``runtime.direct_tokens_per_s``: the two rates.
- ``runtime.ms_per_token``: direct time per token; the model is widened until it is
  >= 5 ms, so the ratio measures a model that does real work.
- ``runtime.host_overhead_us_per_token``: time spent inside the wasi_ephemeral_nn
  host functions (loading excluded) minus the time inside llama.cpp's C calls
  (tokenize, decode, sample, EOG test, piece, clears), per generated token: the
  Python host side's own cost. Measured in
  a guest process whose host functions and llama.cpp calls are wrapped in timers
  (the wrappers' own cost counts as overhead, so this errs high).

- ``runtime.default_threads_tokens_per_s.embedded`` / ``.wasmedge``: the guest's
  tokens/s at the threads ``edgebundle run`` sends by default (the CPUs this process
  may use), on the embedded runtime and, with ``--wasmedge PATH`` (a genuine
  ``wasmedge``; set LD_LIBRARY_PATH and WASMEDGE_PLUGIN_PATH for it), on genuine
  WasmEdge; ``.wasmedge.ratio`` = genuine over embedded in the same rounds (goal
  >= 0.95: a device on genuine WasmEdge is as fast). ``.wasmedge_unset``: genuine with
  no ``threads`` sent (the plugin's default of 4), with ``.ratio`` over the default:
  what always sending ``threads`` saves.

Model loading and prompt evaluation are excluded: rates come from the interval
between the first and the last generated token. Runs alternate guest/direct so
background load hits both alike; ratios and differences are taken between
neighbouring runs and their median is reported. Default 1 thread: on a
shared machine, more ggml threads than free cores makes timings meaningless.

Usage: python bench/runtime.py [--quick] [--threads N] [--wasmedge PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.guest_protocol import Delta, End, GuestOutputParser, Ready, encode_request
from edgebundle.host import usable_cpus

REPO = Path(__file__).resolve().parents[1]
EDGECHAT = REPO / "wasm" / "edgechat.wasm"
PROMPT = (b"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTell me something."
          b"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
MIN_MS_PER_TOKEN = 5.0
CTX = 512


def reply_words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


def emit(bench: str, value: float, unit: str, baseline: str, goal: str,
         **fields: bool | str) -> None:
    """One bench line; ``fields`` are extra facts of the measurement (checks, counts)."""
    print(json.dumps({"bench": bench, "value": round(value, 4), "unit": unit,
                      "baseline": baseline, "goal": goal, **fields}), flush=True)


def rate(times: list[float]) -> float:
    """Tokens per second over the intervals between the first and last token."""
    return (len(times) - 1) / (times[-1] - times[0])


class Direct:
    """llama-cpp-python's high-level API, as an application would use it."""

    def __init__(self, model: Path, threads: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(model), n_ctx=CTX, n_batch=CTX, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.tokens = self.llm.tokenize(PROMPT, add_bos=False, special=True)

    def run(self) -> tuple[list[float], bytes]:
        times: list[float] = []
        out: list[int] = []
        self.llm.reset()  # evaluate the prompt again, as the guest does per request
        for token in self.llm.generate(self.tokens):  # sampling defaults = the plugin's
            now = time.perf_counter()
            if self.llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            times.append(now)
            out.append(token)
        return times, self.llm.detokenize(out, special=True)

    def close(self) -> None:
        self.llm.close()


# Runs edgechat like `edgebundle exec`, with timers around the host functions and
# around llama.cpp's per-token C calls; writes the totals to $STATS at exit.
TIMED_RUNNER = """
import json, os, sys, time
from pathlib import Path
from edgebundle.runtime.embedded import host
from edgebundle.runtime.embedded.llama_bindings import llama_cpp  # what the runtime calls
from edgebundle.runtime.embedded.preload import parse_preload
clock = time.perf_counter
stats = {"host_s": 0.0, "llama_s": 0.0}
def timed_c(fn):
    def call(*args):
        start = clock()
        try:
            return fn(*args)
        finally:
            stats["llama_s"] += clock() - start
    return call
for name in ("llama_sampler_sample", "llama_decode", "llama_vocab_is_eog",
             "llama_token_to_piece", "llama_tokenize", "llama_memory_clear",
             "llama_sampler_reset"):
    setattr(llama_cpp, name, timed_c(getattr(llama_cpp, name)))
plain = host.HostCalls._callback
LOADING = {"load", "load_by_name", "load_by_name_with_config", "init_execution_context"}
def timed_callback(self, method, arity, with_memory):
    inner = plain(self, method, arity, with_memory)
    if method.__name__ in LOADING:  # model loading is not per-token work
        return inner
    def call(env, caller, values, count):
        start = clock()
        try:
            return inner(env, caller, values, count)
        finally:
            stats["host_s"] += clock() - start
    return call
host.HostCalls._callback = timed_callback
code = host.run_app(Path(sys.argv[1]), sys.argv[3:], preloads=[parse_preload(sys.argv[2])])
Path(os.environ["STATS"]).write_text(json.dumps(stats))
sys.exit(code)
"""


class Guest:
    """wasm/edgechat.wasm under `edgebundle exec`, read through the protocol."""

    def __init__(self, model: Path, threads: int | None, stats: Path | None = None,
                 runtime: list[str] | None = None) -> None:
        # flash attention off: llama-cpp-python's default (the plugin's is auto)
        options: dict[str, Any] = {"ctx-size": CTX, "batch-size": CTX, "flash-attn": "off"}
        if threads is not None:  # None: the plugin's own default
            options |= {"threads": threads, "threads-batch": threads}
        config = json.dumps(options)
        preload = f"default:GGML:AUTO:{model}"
        if stats is None:
            argv = [*(runtime or [sys.executable, "-m", "edgebundle", "exec"]),
                    "--nn-preload", preload, str(EDGECHAT), "--config", config]
        else:
            argv = [sys.executable, "-c", TIMED_RUNNER, str(EDGECHAT), preload,
                    "--config", config]
        env = {**os.environ, "STATS": str(stats)} if stats else None
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=REPO, env=env)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)
        self.parser = GuestOutputParser()
        first = self._events()
        if not isinstance(first[0][0], Ready):
            raise SystemExit(f"guest did not start: {first}")

    def _events(self) -> list[tuple[Any, float]]:
        """Read until at least one event arrives; each event with its arrival time."""
        while True:
            if not self.selector.select(120):
                raise SystemExit("guest silent for 120 s")
            data = os.read(self.fd, 65536)
            now = time.perf_counter()
            if not data:
                raise SystemExit("guest exited")
            events = self.parser.feed(data)
            if events:
                return [(event, now) for event in events]

    def run(self) -> tuple[list[float], bytes]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_request(PROMPT, b"", 0))
        self.proc.stdin.flush()
        times: list[float] = []
        text = b""
        while True:
            for event, now in self._events():
                if isinstance(event, Delta):
                    times.append(now)
                    text += event.data
                elif isinstance(event, End):
                    if event.reason != "eos":
                        raise SystemExit(f"guest ended with {event}")
                    return times, text

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.selector.close()


def measure(model: Path, threads: int, rounds: int) -> tuple[list[float], list[float], bytes]:
    """Tokens/s of the guest and of direct per round (alternating), after a warm-up each."""
    direct, guest = Direct(model, threads), Guest(model, threads)
    try:
        direct_rates, guest_rates = [], []
        expected = direct.run()[1]
        if guest.run()[1] != expected:
            raise SystemExit("guest and direct generated different text")
        for _ in range(rounds):
            times, text = guest.run()
            guest_rates.append(rate(times))
            times, text2 = direct.run()
            direct_rates.append(rate(times))
            if text != expected or text2 != expected:
                raise SystemExit("generation is not deterministic; the comparison is void")
        return guest_rates, direct_rates, expected
    finally:
        guest.close()
        direct.close()


def runtime_rates(model: Path, rounds: int, wasmedge: str | None
                  ) -> dict[str, list[float]]:
    """Guest tokens/s per round at run's default threads: embedded, genuine, and
    genuine without threads (alternating, so background load hits all alike)."""
    threads = usable_cpus()
    guests = {"embedded": Guest(model, threads)}
    if wasmedge:
        guests["wasmedge"] = Guest(model, threads, runtime=[wasmedge])
        guests["wasmedge_unset"] = Guest(model, None, runtime=[wasmedge])
    try:
        expected = guests["embedded"].run()[1]
        for name, guest in guests.items():
            if guest.run()[1] != expected:
                raise SystemExit(f"{name} generated other text than the embedded runtime")
        rates: dict[str, list[float]] = {name: [] for name in guests}
        for _ in range(max(1, rounds // 3)):
            for name, guest in guests.items():
                rates[name].append(rate(guest.run()[0]))
        return rates
    finally:
        for guest in guests.values():
            guest.close()


def pick_model(root: Path, threads: int, words: int = 60
               ) -> tuple[Path, ScriptedModelSpec, float]:
    """8 layers x 512, widened until one token takes >= 5 ms on this machine."""
    for width in (512, 768, 1024, 1536, 2048):
        spec = ScriptedModelSpec(layers=8, width=width, reply=reply_words(words))
        path = write_scripted_model(root / f"bench-8x{width}.gguf", spec)
        direct = Direct(path, threads)
        try:
            direct.run()
            ms = 1000 / statistics.median(rate(direct.run()[0]) for _ in range(2))
        finally:
            direct.close()
        if ms >= MIN_MS_PER_TOKEN:
            return path, spec, ms
        path.unlink()
    return path, spec, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (both sides)")
    parser.add_argument("--wasmedge", metavar="PATH",
                        help="a genuine wasmedge to compare at the default threads")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15

    with tempfile.TemporaryDirectory(prefix="edgebundle-bench-") as tmp:
        root = Path(tmp)
        model, spec, _ = pick_model(root, args.threads)
        guest_rates, direct_rates, text = measure(model, args.threads, rounds)
        # Neighbouring runs see the same background load: compare them pairwise.
        ratio = statistics.median(g / d for g, d in zip(guest_rates, direct_rates, strict=True))
        print(f"# model {spec.layers} layers x {spec.width}, {len(text.split())} tokens/reply, "
              f"threads {args.threads}, rounds {rounds}", file=sys.stderr)
        emit("runtime.tokens_per_s_ratio", ratio, "ratio", "llama-cpp-python direct", ">= 0.95")
        emit("runtime.guest_tokens_per_s", statistics.median(guest_rates), "tokens/s",
             "edgechat.wasm on edgebundle exec", "-")
        direct_tps = statistics.median(direct_rates)
        emit("runtime.direct_tokens_per_s", direct_tps, "tokens/s",
             "llama-cpp-python Llama.generate", "-")
        emit("runtime.ms_per_token", 1000 / direct_tps, "ms", "llama-cpp-python direct",
             f">= {MIN_MS_PER_TOKEN:g}")

        rates = runtime_rates(model, rounds, args.wasmedge)
        embedded = statistics.median(rates["embedded"])
        threads = usable_cpus()
        emit("runtime.default_threads_tokens_per_s.embedded", embedded, "tokens/s",
             f"edgechat.wasm on edgebundle exec, threads {threads} (run's default)", "-")
        if args.wasmedge:
            genuine = statistics.median(rates["wasmedge"])
            pairs = zip(rates["wasmedge"], rates["embedded"], strict=True)
            emit("runtime.default_threads_tokens_per_s.wasmedge", genuine, "tokens/s",
                 f"genuine wasmedge, threads {threads}", "-",
                 ratio=str(round(statistics.median(g / e for g, e in pairs), 4)))
            unset = statistics.median(rates["wasmedge_unset"])
            pairs = zip(rates["wasmedge_unset"], rates["wasmedge"], strict=True)
            emit("runtime.default_threads_tokens_per_s.wasmedge_unset", unset, "tokens/s",
                 "genuine wasmedge, no threads sent (the plugin's default)", "-",
                 ratio=str(round(statistics.median(u / g for u, g in pairs), 4)))

        stats = root / "stats.json"
        guest = Guest(model, args.threads, stats)
        tokens = sum(len(guest.run()[0]) for _ in range(rounds))
        guest.close()
        timed = json.loads(stats.read_text())
        emit("runtime.host_overhead_us_per_token",
             (timed["host_s"] - timed["llama_s"]) / tokens * 1e6, "us",
             "time in host functions minus llama.cpp calls",
             f"<= {MIN_MS_PER_TOKEN * 1000 * 0.05:g}")


if __name__ == "__main__":
    main()
