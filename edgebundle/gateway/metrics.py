"""``GET /metrics``: the gateway's Prometheus metrics, in the text exposition format 0.0.4.

Built on prometheus_client, each app with its own :class:`CollectorRegistry` (a
process may serve several apps, tests build many: the global registry would mix
them and refuse a second registration of the same name).

Two kinds of values:

- observed as they happen, by :class:`MetricsMiddleware` (outermost, so a request
  refused for its API key counts too): HTTP requests by route *template* (never the
  raw path: a thread id in a label would grow the series without bound), method and
  status; request durations by route; SSE streams open. These are the library's
  Counter, Histogram and Gauge.
- read at scrape time from what already counts them (:meth:`GatewayMetrics.collect`):
  the engine (ready, guest restarts, tokens), this device's run generator (runs by
  final status, runs whose prompt left out older messages and how many) and a PING of
  the sync Redis with a short timeout. The gauges among them are the library's Gauge;
  the counters are :class:`Totals`, see there why.

Everything is single-threaded on the event loop, so no locks of our own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector as PrometheusCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from edgebundle.sync.replication import ReplicationStatus

# The 0.0.4 text format, as /metrics always answered (scrapers and the OpenAPI
# document say 0.0.4; the library's latest is a newer version).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Prometheus' default buckets, plus long ones: a streamed reply lasts seconds to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
REDIS_PING_TIMEOUT = 0.5  # seconds: a scrape must not hang on an unreachable Redis
UNMATCHED = "unmatched"  # the route label of a path no route serves
# HTTP allows any token as a method: others share one label, so labels stay bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# No ``*_created`` series: /metrics exposes the same series it always did (the library's
# documented switch; it is process-wide, and nothing else here uses the library).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library


class Totals(PrometheusCollector):
    """A counter whose totals are counted elsewhere (the engine, the run generator) and
    taken at scrape time with :meth:`set_total`.

    Hand-written on purpose: prometheus_client's :class:`~prometheus_client.Counter`
    only moves by ``inc()`` from inside this process, so a total owned by another part
    is exposed the way the library documents for that, a custom collector yielding a
    :class:`~prometheus_client.core.CounterMetricFamily`.
    """

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name.removesuffix("_total")  # the family adds it to the sample
        self.help = help_text
        self.label_names = tuple(labels)
        # Unlabelled: a 0 from the start, as the library's own counters show.
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def set_total(self, *labels: str, total: float) -> None:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        self._values[tuple(labels)] = total

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.help, labels=self.label_names)
        for key, value in sorted(self._values.items()):
            family.add_metric(list(key), value)
        yield family


Collector = Callable[[], Awaitable[None]]


class GatewayMetrics:
    """The gateway's metrics; :meth:`render` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        into = self.registry
        self.requests = Counter("edgebundle_http_requests_total",
                                "HTTP requests answered, by route template, method and status.",
                                ("route", "method", "status"), registry=into)
        self.duration = Histogram("edgebundle_http_request_duration_seconds",
                                  "Time from request to the end of the response (whole stream "
                                  "for SSE), by route template.", ("route",),
                                  buckets=DURATION_BUCKETS, registry=into)
        self.sse_open = Gauge("edgebundle_sse_streams_open",
                              "Server-sent event streams open now.", registry=into)
        self.runs = self._register(Totals("edgebundle_runs_total",
                                          "Sync runs generated on this device, by final status.",
                                          ("status",)))
        self.tokens = self._register(Totals("edgebundle_tokens_generated_total",
                                            "Tokens the model generated on this device."))
        self.prompt_tokens = self._register(Totals(
            "edgebundle_prompt_tokens_total", "Prompt tokens the model evaluated on this device."))
        self.engine_ready = Gauge("edgebundle_engine_ready",
                                  "1 while the chat guest is up and has loaded its model.",
                                  registry=into)
        self.restarts = self._register(Totals("edgebundle_guest_restarts_total",
                                              "Times the supervisor restarted the chat guest."))
        # Exposed only once sync is on (watch_redis) or the device keeps a local store
        # (watch_replication): a gateway without them has no such series at all.
        self.windowed_runs = Totals("edgebundle_context_windowed_runs_total",
                                    "Completed sync runs on this device whose prompt left out "
                                    "older messages of the thread to fit the context.")
        self.dropped_messages = Totals("edgebundle_context_dropped_messages_total",
                                       "Older thread messages left out of the prompts of "
                                       "completed sync runs on this device.")
        self.redis_up = Gauge("edgebundle_sync_redis_up",
                              "1 if the sync Redis answered PING at scrape time "
                              f"(within {REDIS_PING_TIMEOUT:g} s).", registry=None)
        self.offline = Gauge("edgebundle_sync_offline",
                             "1 while this device serves from its local store because the "
                             "central Redis does not answer.", registry=None)
        self.pending = Gauge("edgebundle_sync_pending_changes",
                             "Changes made offline on this device not yet in the central store.",
                             registry=None)
        self._collectors: list[Collector] = []

    def _register(self, totals: Totals) -> Totals:
        self.registry.register(totals)
        return totals

    def add_collector(self, collector: Collector) -> None:
        """``collector`` updates values counted elsewhere, at every scrape."""
        self._collectors.append(collector)

    def watch_redis(self, ping: Callable[[], Awaitable[Any]]) -> None:
        """Expose :attr:`redis_up` (sync is on), set by ``ping`` at every scrape."""
        for metric in (self.windowed_runs, self.dropped_messages, self.redis_up):
            self.registry.register(metric)

        async def check() -> None:
            try:
                async with asyncio.timeout(REDIS_PING_TIMEOUT):  # edgebundle.tasks
                    await ping()
            except Exception:  # any failure to answer is "down"; the scrape must go on
                self.redis_up.set(0)
            else:
                self.redis_up.set(1)

        self.add_collector(check)

    def watch_replication(self, status: Callable[[], Awaitable[ReplicationStatus]]) -> None:
        """Expose :attr:`offline` and :attr:`pending` (the device has a local store)."""
        self.registry.register(self.offline)
        self.registry.register(self.pending)

        async def check() -> None:
            now = await status()
            self.offline.set(0 if now.online else 1)
            self.pending.set(now.pending)

        self.add_collector(check)

    async def collect(self) -> None:
        for collector in self._collectors:
            await collector()

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    async def endpoint(self, request: Request) -> Response:
        await self.collect()
        return Response(self.render(), media_type=CONTENT_TYPE)


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route serving ``scope`` (``/v1/threads/{thread_id}``)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE and isinstance(route, Route):
            return route.path  # PARTIAL: the path matched, the method did not (a 405)
    return UNMATCHED


class MetricsMiddleware:
    """Counts every HTTP request and times it; tracks the SSE streams that are open."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics,
                 routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's own list: routes added later are seen too

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.routes, scope)
        started = time.monotonic()
        status = 500  # what the server answers if the app raises before responding
        streaming = False

        async def observing_send(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    streaming = True
                    self.metrics.sse_open.inc()
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            if streaming:
                self.metrics.sse_open.dec()
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.duration.labels(route).observe(time.monotonic() - started)
