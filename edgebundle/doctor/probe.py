"""``doctor --probe``: one short generation on the runtime ``run`` would use.

The other checks look at files and versions; this one runs the chat guest the way
``run`` starts it (same runtime choice, threads, frame and supervisor), with the demo
model (so it needs nothing but the installation), and reports:

- ``runtime.probe`` ok: ``<runtime>: <n> tokens at <r> tokens/s, first token <t> ms
  (start <s> s, threads <k>)``;
- warn: the reply was right but the runtime wrote foreign lines on the guest's stdout
  (its log: named in the summary), the guest was restarted, or generation ran at
  under :data:`SLOW_TOKENS_PER_S` (on the demo model, a sign of threads oversubscribed
  or a debug build);
- fail: the guest did not start, or the reply was not the demo model's.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import replace

from edgebundle.completion import ChatParams, ChatService, TextDelta, chat_setup
from edgebundle.config import Settings
from edgebundle.demo_model import DEMO_REPLY
from edgebundle.doctor.report import CheckResult, fail, ok, warn
from edgebundle.engine import Engine
from edgebundle.errors import EdgebundleError
from edgebundle.runtime.launch import WasmEdgeFailures, resolve_launch
from edgebundle.templates import Message

PROBE = "runtime.probe"
SLOW_TOKENS_PER_S = 50.0  # the demo model is tiny: any sane runtime does far more
TIMEOUT = 300.0  # s for start + reply (a slow device loading from an SD card)


def probe(settings: Settings, wasmedge_failures: WasmEdgeFailures) -> CheckResult:
    """Run the probe (blocking) and say what it saw; ``wasmedge_failures`` decides
    ``--runtime auto`` as for ``run``."""
    try:
        return asyncio.run(asyncio.wait_for(_probe(settings, wasmedge_failures), TIMEOUT))
    except TimeoutError:
        return fail(PROBE, f"no reply from the runtime within {TIMEOUT:g} s",
                    "see the probe's guest log named above; run `edgebundle doctor` "
                    "without --probe for the runtime's files")
    except EdgebundleError as exc:
        return fail(PROBE, f"the chat guest did not run: {exc}",
                    "fix what the other runtime.* and wasmedge.* checks report")


async def _probe(settings: Settings, wasmedge_failures: WasmEdgeFailures) -> CheckResult:
    demo = replace(settings, model=None, app=None, app_kind=None, template=None)
    spec = resolve_launch(demo, wasmedge_failures=wasmedge_failures)
    setup = chat_setup(demo, spec)
    log_path = settings.layout.logs / "probe.log"  # kept with the device's other logs
    engine = Engine(spec, log_path=log_path)
    started = time.monotonic()
    await engine.start()
    start_s = time.monotonic() - started
    service = ChatService(engine, setup.template, setup.model_info, None, spec.ctx_size)
    times: list[float] = []
    text: list[str] = []
    try:
        asked = time.monotonic()
        async with aclosing(service.complete([Message("user", "Hello")], ChatParams())) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    times.append(time.monotonic())
                    text.append(event.text)
    finally:
        await engine.stop()
    reply = "".join(text)
    threads = _threads(spec.argv)
    if reply.strip() != DEMO_REPLY:
        return fail(PROBE, f"{spec.runtime}: the demo model answered {reply[:60]!r}, not its "
                           f"scripted reply (guest log: {log_path})",
                    "reinstall the runtime (./install.sh) or run with --runtime embedded")
    first_ms = (times[0] - asked) * 1000
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    summary = (f"{spec.runtime}: {len(times)} pieces at {rate:.0f} tokens/s, first token "
               f"{first_ms:.0f} ms (start {start_s:.2f} s, threads {threads})")
    problems = []
    if engine.foreign_lines:
        problems.append(f"{engine.foreign_lines} line(s) of the runtime's log on the guest's "
                        f"stdout (see {log_path})")
    if engine.restarts:
        problems.append(f"the guest was restarted {engine.restarts} time(s)")
    if rate and rate < SLOW_TOKENS_PER_S:
        problems.append(f"under {SLOW_TOKENS_PER_S:g} tokens/s on the demo model")
    if problems:
        return warn(PROBE, f"{summary}; " + "; ".join(problems),
                    "check the threads setting against the CPUs (doctor's host.cpu) and the "
                    "guest log")
    return ok(PROBE, summary)


def _threads(argv: tuple[str, ...]) -> str:
    """The threads in the guest's load config (what the plugin was told)."""
    import json

    if "--config" in argv:
        config = json.loads(argv[argv.index("--config") + 1])
        return str(config.get("threads", "plugin default"))
    return "plugin default"
