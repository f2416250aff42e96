"""Serve the gateway with uvicorn while the engine loads and runs behind it.

Order matters for probes: the socket is bound first (a taken port is one clear
error before anything starts), then the guest starts (``run`` starts it before it
even imports this module, see :func:`edgebundle.serving.serve`, so the model loads
while the gateway starts); the HTTP server answers /healthz with 503 until the guest
said READY, then 200. Stopping reverses it: the HTTP server stops (in-flight replies
get a short grace), then the guest.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from edgebundle.completion import ChatService, ChatSetup, chat_engine
from edgebundle.config import Settings
from edgebundle.engine import READY_TIMEOUT, Engine
from edgebundle.errors import EdgebundleError, RedisAccessError, SupervisorError
from edgebundle.gateway.app import GatewayState, create_app
from edgebundle.gateway.guard import guard_settings
from edgebundle.gateway.listen import bind, url_for
from edgebundle.limits import Limits, blocking_connections
from edgebundle.sync.client import connect
from edgebundle.sync.replication import DeviceSync
from edgebundle.sync.service import SyncService, ThreadSync
from edgebundle.turns import RunGenerator

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN = 3  # seconds in-flight requests get once a stop was asked for
_TICK = 0.05


@dataclass(frozen=True)
class Listening:
    """The gateway accepts connections; the model may still be loading."""

    url: str
    engine: Engine


async def run_gateway(
    settings: Settings,
    setup: ChatSetup,
    *,
    stop: threading.Event,
    on_listening: Callable[[Listening], None] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    redis_url: str | None = None,
    device_id: str = "",
    local_url: str | None = None,
    sock: socket.socket | None = None,
    engine: Engine | None = None,
    starting: asyncio.Task[None] | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM); raise if the guest cannot run.

    With ``redis_url`` the sync API is served too, this device being ``device_id``;
    with ``local_url`` too, that Redis is the device's local store and it keeps
    answering while ``redis_url`` is unreachable (:mod:`edgebundle.sync.replication`).
    ``sock``, ``engine`` and ``starting`` (its ``start()`` task): bound and started
    by the caller already; served, stopped and closed here like their own.
    """
    sock = sock if sock is not None else bind(settings.host, settings.port)
    sync: ThreadSync | None = None
    if redis_url:
        try:
            sync = await _sync_for(settings, redis_url, local_url, device_id)
        except BaseException:
            sock.close()
            raise
    engine = engine if engine is not None else chat_engine(settings, setup, ready_timeout)
    chat = ChatService(
        engine, setup.template, setup.model_info, settings.system_prompt, setup.spec.ctx_size
    )
    limits = Limits.of(settings)
    runs = RunGenerator(sync, chat, settings.context_policy, limits) if sync is not None \
        else None
    state = GatewayState(engine=engine, chat=chat, model_id=setup.model_id,
                         runtime=setup.spec.runtime, sync=sync, device_id=device_id, runs=runs)
    config = uvicorn.Config(
        create_app(state, api_key=settings.api_key, guard=guard_settings(
            settings.host, settings.allowed_hosts, settings.allowed_origins,
            settings.max_body_bytes)),
        lifespan="off",
        ws="none",  # no websocket routes: uvicorn need not import websockets/wsproto
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    failure: BaseException | None = None
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()  # it could not start: raise why
            return
        if on_listening is not None:
            on_listening(Listening(url_for(settings.host, settings.port), engine))
        if starting is None:
            starting = asyncio.create_task(engine.start())
        while not serving.done():
            if stop.is_set():
                server.should_exit = True
            if failure is None:
                failure = _failure(starting, engine)
                if failure is not None:
                    server.should_exit = True
            await asyncio.wait({serving}, timeout=_TICK)
        serving.result()
    finally:
        server.should_exit = True
        if not serving.done():
            await asyncio.wait({serving})
        sock.close()
        if starting is not None and not starting.done():
            starting.cancel()
        if runs is not None:  # while Redis is still there: their runs end as failed
            await runs.close()
        await engine.stop()
        if isinstance(sync, DeviceSync):
            await sync.close()
        elif isinstance(sync, SyncService):
            await sync.aclose()
    if failure is not None:
        raise failure


async def _sync_for(settings: Settings, redis_url: str, local_url: str | None,
                    device_id: str) -> ThreadSync:
    """The sync core: the central store, and the local one for offline use if given."""
    blocking = blocking_connections(Limits.of(settings))
    if local_url is None:
        return await _service(redis_url, blocking)

    async def connect_central() -> SyncService:
        return await _service(redis_url, blocking)

    local = await _service(local_url, blocking)
    try:
        central: SyncService | None = await connect_central()
    except RedisAccessError as exc:  # a device that boots offline serves at once
        log.warning("the central Redis is unreachable (%s): serving offline from the local "
                    "store until it answers", exc)
        central = None
    device = DeviceSync(central, local, device_id, offline_after=settings.offline_after,
                        connect_central=connect_central)
    await device.start()
    return device


async def _service(url: str, blocking: int) -> SyncService:
    """The sync core on ``url``, its blocking reads on a pool of their own of
    ``blocking`` connections (edgebundle.limits); both pools wait when full."""
    redis = await connect(url, wait_for_pool=True)
    try:
        readers = await connect(url, pool_size=blocking, wait_for_pool=True)
    except BaseException:
        await redis.aclose()
        raise
    return SyncService(redis, blocking=readers)


def _failure(starting: asyncio.Task[None], engine: Engine) -> BaseException | None:
    """Why serving cannot go on: the guest did not start, or keeps crashing."""
    if starting.done() and not starting.cancelled():
        error = starting.exception()
        if error is not None:
            return error if isinstance(error, EdgebundleError) else SupervisorError(
                f"the chat engine failed: {error}"
            )
    return engine.failure
