"""``edgebundle run`` and ``edgebundle ask`` without the CLI: the wiring of the layers
below (runtime, engine, chat, doctor, sync, gateway) into the two jobs.

Layering: this module sits above all of them, so none of them imports it, and
``--runtime auto`` gets doctor's wasmedge checks from here (:func:`launch_spec`):
``runtime/`` never imports doctor.

``run``: preflight, supervise, serve until signalled.

The edgechat app (the default) is served through the HTTP gateway
(:mod:`edgebundle.gateway`): /healthz answers 503 at once, 200 once the guest is
ready. A LlamaEdge llama-api-server serves HTTP itself and is only supervised.

SIGINT and SIGTERM only set a stop event (when called on the main thread); the
gateway and the child are then stopped in order (the supervisor sends SIGTERM,
waits, then SIGKILLs its own pid) and :func:`serve` returns normally.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from edgebundle import apps
from edgebundle.completion import (
    ChatParams,
    ChatService,
    ChatSetup,
    Finished,
    TextDelta,
    Usage,
    chat_engine,
    chat_setup,
    runtime_line,
)
from edgebundle.config import Settings
from edgebundle.engine import Engine
from edgebundle.errors import EdgebundleError, SupervisorError, UsageError
from edgebundle.gateway.listen import bind
from edgebundle.runtime.launch import LaunchSpec, resolve_launch
from edgebundle.runtime.supervisor import Supervisor
from edgebundle.templates import Message

if TYPE_CHECKING:
    from edgebundle.gateway import Listening

READY_TIMEOUT = 600.0  # loading a multi-GB model on a small device takes minutes


@dataclass(frozen=True)
class ServeInfo:
    """What is running, for the one line the CLI prints once it is ready."""

    app: str
    url: str | None  # None for apps that do not listen (llama-chat)
    runtime: str
    pid: int | None
    log_path: Path
    model: str = ""  # the model's name in the API (edgechat)
    template: str = ""  # the prompt template (edgechat)
    reason: str = ""  # why this runtime


def serve(
    settings: Settings,
    *,
    preflight: bool = True,
    on_ready: Callable[[ServeInfo], None] | None = None,
    stop: threading.Event | None = None,
    environ: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    on_note: Callable[[str], None] | None = None,
) -> None:
    """Start the app under a supervisor and keep it up until ``stop`` or a signal.

    ``on_note`` gets what the user must be told first (e.g. the demo model is used);
    ``on_ready`` gets the :class:`ServeInfo` once it serves (edgechat: once the
    gateway listens, while the model may still load).
    """
    spec = launch_spec(settings, environ)
    for note in spec.notes:
        if on_note is not None:
            on_note(note)
    if preflight:
        run_preflight(replace(settings, model=spec.model, app=spec.app), spec, environ)
    if spec.kind == "edgechat":
        _serve_chat(settings, spec, on_ready=on_ready, stop=stop, ready_timeout=ready_timeout,
                    on_note=on_note)
        return
    probe = apps.readiness_probe(spec.kind, settings.host, settings.port)
    if probe is not None and probe():
        # Someone else answers there: the probe would pass for the wrong server.
        raise SupervisorError(
            f"{settings.host}:{settings.port} is already in use by another process: stop it, "
            "or pass --port N"
        )
    stop_event = stop if stop is not None else threading.Event()
    supervisor = Supervisor(
        spec,
        log_path=settings.layout.logs / f"{spec.kind}.log",
        ready=probe,
        settle=apps.SETTLE_SECONDS,
    )
    with _stop_on_signals(stop_event):
        supervisor.start()
        try:
            if not supervisor.wait_ready(ready_timeout, cancel=stop_event):
                return
            if on_ready is not None:
                on_ready(_info(settings, spec, supervisor))
            supervisor.run_until(stop_event)
        finally:
            supervisor.stop()


def _serve_chat(
    settings: Settings,
    spec: LaunchSpec,
    *,
    on_ready: Callable[[ServeInfo], None] | None,
    stop: threading.Event | None,
    ready_timeout: float,
    on_note: Callable[[str], None] | None = None,
) -> None:
    """The edgechat guest behind the HTTP gateway, until ``stop`` or a signal.

    The gateway serves the sync API over ``settings.redis_url``, or, without one, over
    a private redis-server started here (AOF on) and stopped when serving ends; it
    dies with this process, and a server an earlier ``run`` left behind is stopped
    first (:mod:`edgebundle.sync.local_server`). With a Redis URL the private server is
    the device's local store (offline-first, see :mod:`edgebundle.sync.replication`)
    when redis-server is installed.

    Start-up order: the port is bound (a taken port is one error before anything
    starts), the guest starts loading its model, and only then this process imports
    the gateway (Starlette, uvicorn, Redis, pydantic) and starts Redis: the two
    overlap instead of adding up.
    """

    setup = chat_setup(settings, spec)

    def listening(event: Listening) -> None:
        if on_ready is not None:
            on_ready(ServeInfo(
                app=spec.app.name if spec.app is not None else spec.argv[0],
                url=event.url,
                runtime=spec.runtime,
                pid=event.engine.pid,
                log_path=event.engine.log_path,
                model=setup.model_id,
                template=setup.template.name,
                reason=spec.reason,
            ))  # fmt: skip

    stop_event = stop if stop is not None else threading.Event()
    with _stop_on_signals(stop_event):
        asyncio.run(_chat_gateway(settings, setup, stop=stop_event, on_listening=listening,
                                  ready_timeout=ready_timeout, on_note=on_note))


async def _chat_gateway(
    settings: Settings,
    setup: ChatSetup,
    *,
    stop: threading.Event,
    on_listening: Callable[[Listening], None],
    ready_timeout: float,
    on_note: Callable[[str], None] | None,
) -> None:
    sock = bind(settings.host, settings.port)
    engine = chat_engine(settings, setup, ready_timeout)
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0)  # its first step starts the supervisor, which spawns the guest
    try:
        # Everything below runs while the guest loads its model.
        from edgebundle.gateway import run_gateway
        from edgebundle.sync.local_server import LocalRedis, device_id

        device = device_id(settings)
        local: LocalRedis | None = None
        redis_url = settings.redis_url
        if not redis_url and not LocalRedis.installed():
            # The chat itself needs no Redis: serve it, and say what is missing for sync.
            if on_note is not None:
                on_note("no --redis-url and no redis-server installed: serving the chat "
                        "without sync (no /v1/threads); install redis-server "
                        "(./install.sh --with-redis) or pass --redis-url")
        elif not LocalRedis.installed():
            if on_note is not None:
                on_note("no redis-server installed: this device cannot answer while the "
                        "central Redis is unreachable (install redis-server for offline use)")
        else:
            # Started and stopped on this thread, which runs the gateway to the end: the
            # server's pdeathsig fires when the thread that forked it ends (local_server).
            local = LocalRedis(settings.layout.state / "redis").start()
            if on_note is not None and local.replaced is not None:
                on_note(f"stopped a redis-server (pid {local.replaced}) left on "
                        f"{local.directory} by an earlier `edgebundle run`")
            if on_note is not None:
                lead = ("local store for offline use: a" if redis_url
                        else "no --redis-url: started a")
                on_note(f"{lead} private redis-server (pid {local.pid}, AOF on) on "
                        f"{local.shown_url}, data in {local.directory} (its URL with the "
                        f"password: {local.url_file})")
        local_url = local.url if local is not None and redis_url else None
        redis_url = redis_url or (local.url if local is not None else None)
        try:
            await run_gateway(
                settings, setup, stop=stop, on_listening=on_listening,
                ready_timeout=ready_timeout, redis_url=redis_url, device_id=device,
                local_url=local_url, sock=sock, engine=engine, starting=starting,
            )  # fmt: skip
        finally:
            if local is not None:
                local.stop()
    finally:
        # run_gateway stops and closes them itself; this is for a failure before it ran.
        sock.close()
        if not starting.done():
            starting.cancel()
        elif not starting.cancelled():
            starting.exception()  # retrieved: run_gateway reports it, or nobody needs it
        await engine.stop()


def launch_spec(settings: Settings, environ: Mapping[str, str] | None = None) -> LaunchSpec:
    """What ``run`` starts for ``settings``; ``--runtime auto`` asks doctor's wasmedge
    checks (the same rule doctor's verdict reports)."""
    return resolve_launch(settings, environ, wasmedge_failures=_wasmedge_failures)


def _wasmedge_failures(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    # doctor is imported only when asked (--runtime auto with a wasmedge found, or the
    # preflight): serving with --no-preflight does without its checks' modules.
    from edgebundle.doctor import failed_wasmedge_checks

    return failed_wasmedge_checks(settings, environ)


def run_preflight(
    settings: Settings, spec: LaunchSpec, environ: Mapping[str, str] | None = None
) -> None:
    """Raise EdgebundleError (exit 1) naming the failed doctor checks."""
    from edgebundle.doctor import run_doctor

    report = run_doctor(settings, runtime=spec.runtime, environ=environ)
    if report.ok:
        return
    failed = [check.id for check in report.checks if check.status == "fail"]
    raise EdgebundleError(
        f"preflight failed: {', '.join(failed) or 'doctor reported problems'}; run "
        "`edgebundle doctor` for the fixes (or pass --no-preflight to start anyway)"
    )


def _info(settings: Settings, spec: LaunchSpec, supervisor: Supervisor) -> ServeInfo:
    listens = apps.readiness_probe(spec.kind, settings.host, settings.port) is not None
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return ServeInfo(
        app=spec.app.name if spec.app is not None else spec.argv[0],
        url=f"http://{host}:{settings.port}" if listens else None,
        runtime=spec.runtime,
        pid=supervisor.pid,
        log_path=supervisor.log_path,
        reason=spec.reason,
    )


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into ``stop.set()`` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class AskResult:
    text: str
    reason: str  # eos | length | context_full
    usage: Usage


async def ask(
    settings: Settings,
    prompt: str,
    *,
    max_tokens: int | None = None,
    on_text: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AskResult:
    """Answer one prompt with a guest started for it (and stopped after).

    ``on_text`` gets the reply as it streams; ``on_note`` the lines the user must read
    (the demo model is used, which runtime and why). A stop string ends the turn like
    the model's own end-of-turn token: both report ``eos``.
    """
    if not prompt.strip():
        raise UsageError("the prompt is empty: give the question as an argument, e.g. "
                         "edgebundle ask \"hello\"")
    # ask always talks to the chat guest, whatever app `run` is configured with.
    spec = launch_spec(replace(settings, app=None, app_kind=None), environ)
    setup = chat_setup(settings, spec)
    for note in (*spec.notes, runtime_line(spec)):
        if on_note is not None:
            on_note(note)
    engine = Engine(spec, log_path=settings.layout.logs / "ask.log")
    await engine.start()
    pieces: list[str] = []
    finished = Finished("error", Usage(), "the reply ended without a reason")
    try:
        service = ChatService(engine, setup.template, setup.model_info, settings.system_prompt,
                              spec.ctx_size)
        params = ChatParams(max_tokens=max_tokens)
        async with aclosing(service.complete([Message("user", prompt)], params)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                    if on_text is not None:
                        on_text(event.text)
                else:
                    finished = event
    finally:
        await engine.stop()
    return AskResult("".join(pieces), _ask_reason(finished, spec), finished.usage)


def _ask_reason(finished: Finished, spec: LaunchSpec) -> str:
    if finished.reason in ("eos", "stop"):
        return "eos"
    if finished.reason in ("length", "context_full"):
        return finished.reason
    if finished.reason == "prompt_too_long":
        raise EdgebundleError(
            f"the prompt is {finished.usage.input_tokens} tokens, too long for the context of "
            f"{spec.ctx_size} tokens: shorten it (or raise ctx_size if the model allows more)"
        )
    raise SupervisorError(finished.detail or f"the reply ended with {finished.reason}")
