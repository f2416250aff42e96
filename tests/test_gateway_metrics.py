"""``GET /metrics``: traffic on a real device, then a scrape parsed by Prometheus' own parser.

Real parts only: a real redis-server child, one `python -m edgebundle run` device with
sync and an API key (embedded runtime, real llama.cpp on a scripted tiny model that
says "Looping forever forever …" until max_tokens stops it), real HTTP and SSE. Each
check scrapes before and after, so values are compared by how much they moved.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.devices import Device, endless_model, read_sse, sync_devices
from tests.support.redis_server import RedisServer
from tests.support.serving import started_pids, wait_for

KEY = "metrics-key"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def device(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    root = tmp_path_factory.mktemp("metrics")
    model = endless_model(root)
    with sync_devices(redis.url, model, [root / "home"], api_key=KEY) as [started]:
        yield started


def scrape(device: Device) -> Samples:
    response = device.http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_need_the_api_key(device: Device) -> None:
    assert httpx.get(f"{device.run.base_url}/metrics", timeout=10).status_code == 401
    assert device.http.get("/metrics").status_code == 200


def test_requests_are_counted_and_timed_by_route_template(device: Device) -> None:
    before = scrape(device)
    for _ in range(2):
        assert device.http.get("/v1/models").status_code == 200
    assert httpx.get(f"{device.run.base_url}/v1/models", timeout=10).status_code == 401
    assert device.http.get("/v1/threads/no-such-thread").status_code == 404
    assert device.http.get("/nowhere").status_code == 404
    after = scrape(device)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "edgebundle_http_requests_total"
    assert moved(requests, route="/v1/models", method="GET", status="200") == 2
    assert moved(requests, route="/v1/models", method="GET", status="401") == 1
    assert moved(requests, route="/v1/threads/{thread_id}", method="GET", status="404") == 1
    assert moved(requests, route="unmatched", method="GET", status="404") == 1
    # The previous scrape itself was answered before it was counted: it shows now.
    assert value(after, requests, route="/metrics", method="GET", status="200") >= 1
    duration = "edgebundle_http_request_duration_seconds"
    assert moved(f"{duration}_count", route="/v1/models") == 3
    assert moved(f"{duration}_bucket", route="/v1/models", le="+Inf") == 3
    assert moved(f"{duration}_sum", route="/v1/models") > 0
    assert not any("no-such-thread" in dict(labels).get("route", "") for _, labels in after)


def test_runs_tokens_and_open_streams_move_as_the_device_works(device: Device) -> None:
    before = scrape(device)
    thread = device.post("/v1/threads", {})
    assert thread.status_code == 201
    tid = thread.json()["id"]
    run = device.post(f"/v1/threads/{tid}/runs", {
        "input": {"content": "count me"}, "stream": False, "params": {"max_tokens": 3}})
    assert (run.status_code, run.json()["status"]) == (200, "completed"), run.text
    chat = device.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "and me"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text

    with device.http.stream("GET", f"/v1/threads/{tid}/watch") as watch:
        events = read_sse(watch)  # kept: dropping it would close the stream
        assert next(events)["event"] == "sync"
        during = scrape(device)
    wait_for(lambda: value(scrape(device), "edgebundle_sse_streams_open") == 0, timeout=20)
    after = scrape(device)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(before, "edgebundle_sse_streams_open") == 0
    assert value(during, "edgebundle_sse_streams_open") == 1
    assert moved("edgebundle_runs_total", status="completed") == 1
    assert moved("edgebundle_runs_total", status="failed") == 0
    assert moved("edgebundle_tokens_generated_total") == 3 + 2
    assert moved("edgebundle_prompt_tokens_total") == (
        run.json()["usage"]["input_tokens"] + chat.json()["usage"]["prompt_tokens"])
    assert value(after, "edgebundle_http_requests_total", route="/v1/threads/{thread_id}/runs",
                 method="POST", status="200") >= 1
    assert value(after, "edgebundle_engine_ready") == 1
    assert value(after, "edgebundle_sync_redis_up") == 1


def test_a_guest_restart_is_counted_and_ready_follows_the_guest(device: Device) -> None:
    log = device.run.stderr_path.parent / "logs" / "edgechat.log"
    before = scrape(device)
    assert value(before, "edgebundle_engine_ready") == 1
    [*_, guest] = started_pids(log)
    os.kill(guest, signal.SIGKILL)  # the guest our `run` child started; its supervisor restarts it
    wait_for(lambda: value(scrape(device), "edgebundle_guest_restarts_total")
             == value(before, "edgebundle_guest_restarts_total") + 1, timeout=30)
    device.run.wait_healthy()
    assert value(scrape(device), "edgebundle_engine_ready") == 1


def test_an_unreachable_redis_is_reported_at_scrape(device: Device, redis: RedisServer) -> None:
    """Last in the module: it stops the module's Redis."""
    assert value(scrape(device), "edgebundle_sync_redis_up") == 1
    redis.stop()
    assert value(scrape(device), "edgebundle_sync_redis_up") == 0
