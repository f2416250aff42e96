"""``GET /metrics``: the gateway's Prometheus metrics, in the text exposition format 0.0.4.

Hand-written on purpose (a device should not need another runtime dependency for a
few counters): :class:`Counter`, :class:`Gauge` and :class:`Histogram` keep labelled
values, :class:`GatewayMetrics` owns the gateway's metrics and renders them.

Two kinds of values:

- observed as they happen, by :class:`MetricsMiddleware` (outermost, so a request
  refused for its API key counts too): HTTP requests by route *template* (never the
  raw path: a thread id in a label would grow the series without bound), method and
  status; request durations by route; SSE streams open.
- read at scrape time from what already counts them (:meth:`GatewayMetrics.collect`):
  the engine (ready, guest restarts, tokens), this device's run generator (runs by
  final status, runs whose prompt left out older messages and how many) and a PING of
  the sync Redis with a short timeout.

Everything is single-threaded on the event loop, so no locks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from edgebundle.sync.replication import ReplicationStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus' default buckets, plus long ones: a streamed reply lasts seconds to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
REDIS_PING_TIMEOUT = 0.5  # seconds: a scrape must not hang on an unreachable Redis
UNMATCHED = "unmatched"  # the route label of a path no route serves
# HTTP allows any token as a method: others share one label, so labels stay bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _key(self, labels: Sequence[str]) -> Labels:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return [*self.header(), *self.samples()]


class Counter(_Metric):
    """A value that only goes up; the exposed name ends in ``_total``."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {} if labels else {(): 0.0}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, *labels: str, total: float) -> None:
        """Take a total counted elsewhere (read at scrape time)."""
        self._values[self._key(labels)] = total

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}_total{_labels(self.label_names, key)} {_number(value)}"


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {} if labels else {(): 0.0}

    def set(self, value: float, *labels: str) -> None:
        self._values[self._key(labels)] = value

    def add(self, amount: float, *labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"


class Histogram(_Metric):
    """Observations counted in cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1  # +Inf
        self._sums[key] = self._sums.get(key, 0.0) + value

    def samples(self) -> Iterable[str]:
        names = (*self.label_names, "le")
        for key, counts in sorted(self._counts.items()):
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                yield f"{self.name}_bucket{_labels(names, (*key, _number(bound)))} {count}"
            yield f"{self.name}_sum{_labels(self.label_names, key)} {_number(self._sums[key])}"
            yield f"{self.name}_count{_labels(self.label_names, key)} {counts[-1]}"


Collector = Callable[[], Awaitable[None]]


class GatewayMetrics:
    """The gateway's metrics; :meth:`render` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self.requests = Counter("edgebundle_http_requests_total",
                                "HTTP requests answered, by route template, method and status.",
                                ("route", "method", "status"))
        self.duration = Histogram("edgebundle_http_request_duration_seconds",
                                  "Time from request to the end of the response (whole stream "
                                  "for SSE), by route template.", ("route",))
        self.sse_open = Gauge("edgebundle_sse_streams_open",
                              "Server-sent event streams open now.")
        self.runs = Counter("edgebundle_runs_total",
                            "Sync runs generated on this device, by final status.", ("status",))
        self.windowed_runs = Counter("edgebundle_context_windowed_runs_total",
                                     "Completed sync runs on this device whose prompt left out "
                                     "older messages of the thread to fit the context.")
        self.dropped_messages = Counter("edgebundle_context_dropped_messages_total",
                                        "Older thread messages left out of the prompts of "
                                        "completed sync runs on this device.")
        self.tokens = Counter("edgebundle_tokens_generated_total",
                              "Tokens the model generated on this device.")
        self.prompt_tokens = Counter("edgebundle_prompt_tokens_total",
                                     "Prompt tokens the model evaluated on this device.")
        self.engine_ready = Gauge("edgebundle_engine_ready",
                                  "1 while the chat guest is up and has loaded its model.")
        self.restarts = Counter("edgebundle_guest_restarts_total",
                                "Times the supervisor restarted the chat guest.")
        self.redis_up = Gauge("edgebundle_sync_redis_up",
                              "1 if the sync Redis answered PING at scrape time "
                              f"(within {REDIS_PING_TIMEOUT:g} s).")
        self.offline = Gauge("edgebundle_sync_offline",
                             "1 while this device serves from its local store because the "
                             "central Redis does not answer.")
        self.pending = Gauge("edgebundle_sync_pending_changes",
                             "Changes made offline on this device not yet in the central store.")
        self._sync_on = False
        self._replicated = False
        self._collectors: list[Collector] = []

    def add_collector(self, collector: Collector) -> None:
        """``collector`` updates values counted elsewhere, at every scrape."""
        self._collectors.append(collector)

    def watch_redis(self, ping: Callable[[], Awaitable[Any]]) -> None:
        """Expose :attr:`redis_up` (sync is on), set by ``ping`` at every scrape."""
        self._sync_on = True

        async def check() -> None:
            try:
                await asyncio.wait_for(ping(), REDIS_PING_TIMEOUT)
            except Exception:  # any failure to answer is "down"; the scrape must go on
                self.redis_up.set(0)
            else:
                self.redis_up.set(1)

        self.add_collector(check)

    def watch_replication(self, status: Callable[[], Awaitable[ReplicationStatus]]) -> None:
        """Expose :attr:`offline` and :attr:`pending` (the device has a local store)."""
        self._replicated = True

        async def check() -> None:
            now = await status()
            self.offline.set(0 if now.online else 1)
            self.pending.set(now.pending)

        self.add_collector(check)

    async def collect(self) -> None:
        for collector in self._collectors:
            await collector()

    def render(self) -> str:
        metrics: list[_Metric] = [self.requests, self.duration, self.sse_open, self.runs,
                                  self.tokens, self.prompt_tokens, self.engine_ready,
                                  self.restarts]
        if self._sync_on:
            metrics += [self.windowed_runs, self.dropped_messages, self.redis_up]
        if self._replicated:
            metrics += [self.offline, self.pending]
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"

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
                    self.metrics.sse_open.add(1)
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            if streaming:
                self.metrics.sse_open.add(-1)
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.requests.inc(route, method, str(status))
            self.metrics.duration.observe(time.monotonic() - started, route)
