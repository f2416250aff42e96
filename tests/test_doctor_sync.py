"""sync.replication: what doctor says of a device's link to its central Redis.

The main test asks a real ``edgebundle run`` device (embedded runtime, scripted model,
its own local store) whose central redis-server, with a password, is reached through
a TCP proxy the test cuts and heals. The answers a real device cannot be made to give
on demand (still loading, no local store, not a gateway at all) come from a minimal
real HTTP server standing in for a gateway's /healthz: starting a device for each
would take seconds apiece.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from edgebundle.doctor import CheckResult
from tests.support.devices import Device, mirrored, sync_devices
from tests.support.doctor_env import diagnose
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer
from tests.support.serving import wait_for
from tests.support.tcp_proxy import TcpProxy

PASSWORD = "s3cret-pass"
CHECK = "sync.replication"


def replication(home: Path, port: int, redis_url: str | None = None,
                online: bool = True) -> CheckResult:
    """Doctor's sync.replication for a device whose gateway listens on ``port``."""
    return diagnose(home, port=port, redis_url=redis_url, online=online).check(CHECK)


def doctor_json(home: Path, port: int, redis_url: str) -> dict[str, Any]:
    """``edgebundle doctor --json`` as a user runs it, settings from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env.update(EDGEBUNDLE_HOME=str(home), EDGEBUNDLE_PORT=str(port),
               EDGEBUNDLE_REDIS_URL=redis_url)
    done = subprocess.run([sys.executable, "-m", "edgebundle", "doctor", "--json"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def pending(device: Device) -> tuple[str, int]:
    sync = device.run.healthz().json()["sync"]
    return sync["link"], sync["pending"]


def test_online_then_offline_with_pending_changes_then_online_again(
    tmp_path: Path, home: Path,
) -> None:
    central = RedisServer(tmp_path / "central", password=PASSWORD, aof=True).start()
    proxy = TcpProxy(central.port).start()
    through_proxy = central.url.replace(f":{central.port}/", f":{proxy.port}/")
    model = write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(reply="Noted."))
    try:
        with sync_devices([through_proxy], model, [tmp_path / "device"], ids=("devC",),
                          extra_args=("--offline-after", "1")) as [device]:
            port = device.run.port
            assert replication(home, port, through_proxy) == CheckResult(
                CHECK, "ok", "online, nothing pending")
            thread = device.post("/v1/threads", {"id": "kiosk"}).json()["id"]
            wait_for(lambda: mirrored(device, central, thread), timeout=30)

            proxy.cut(hold=True)
            wait_for(lambda: pending(device)[0] == "offline", timeout=30)
            turn = device.post(f"/v1/threads/{thread}/runs", {
                "device_id": "devC", "input": {"content": "offline question"},
                "stream": False, "params": {"max_tokens": 4}})
            assert turn.status_code == 200, turn.text
            assert pending(device) == ("offline", 2)
            started = time.time()
            check = replication(home, port, through_proxy)
            assert time.time() - started < 2  # a short timeout, no retries
            since = device.run.healthz().json()["sync"]["offline_since"]
            shown = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since))
            assert (check.status, check.summary) == ("warn", (
                f"offline since {shown}, 2 changes pending: the gateway at "
                f"http://127.0.0.1:{port} serves from its local store"))
            redacted = through_proxy.replace(PASSWORD, "***")
            assert check.fix == (f"check the link to the central Redis at {redacted}; the "
                                 "changes are sent when it is back")
            as_json = {c["id"]: c for c in doctor_json(home, port, through_proxy)["checks"]}
            assert as_json[CHECK] == check.to_json()
            assert PASSWORD not in json.dumps(as_json)

            proxy.resume()
            wait_for(lambda: pending(device) == ("online", 0), timeout=30, interval=0.2)
            assert replication(home, port, through_proxy).summary == "online, nothing pending"
    finally:
        proxy.stop()
        central.stop()


# -- a stand-in for the gateway's /healthz ------------------------------------------------


@contextmanager
def standin_gateway(status: int, body: bytes) -> Iterator[int]:
    """A real HTTP server on a free port answering every GET with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # no access log on the test's stderr

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "body", "summary"), [
    (200, b'{"status": "ok", "model": "m", "runtime": "embedded"}',
     "the gateway at http://127.0.0.1:{port} keeps no local store (it has no central Redis, "
     "or no redis-server to keep one)"),
    (503, b'{"status": "loading"}', "the gateway at http://127.0.0.1:{port} is still loading "
                                    "its model"),
    (200, b"<html>hello</html>", "http://127.0.0.1:{port}/healthz did not answer JSON: not an "
                                 "edgebundle gateway?"),
    (404, b"{}", "http://127.0.0.1:{port}/healthz answered HTTP 404: not an edgebundle "
                 "gateway?"),
])
def test_a_gateway_without_a_local_store_or_not_a_gateway_is_skipped(
    home: Path, status: int, body: bytes, summary: str,
) -> None:
    with standin_gateway(status, body) as port:
        check = replication(home, port)
    assert (check.status, check.summary) == ("skip", summary.format(port=port))


def test_online_with_changes_still_to_send_is_ok_and_says_so(home: Path) -> None:
    body = {"status": "ok", "sync": {"link": "online", "pending": 3, "threads_pending": 1,
                                     "offline_since": None}}
    with standin_gateway(200, json.dumps(body).encode()) as port:
        check = replication(home, port)
    assert (check.status, check.summary) == ("ok", "online, sending 3 changes made offline")


def test_no_gateway_running_is_skipped_and_offline_doctor_asks_nobody(home: Path) -> None:
    port = free_port()  # nothing listens there
    check = replication(home, port)
    assert check.status == "skip"
    assert check.summary.startswith(f"no gateway answers on http://127.0.0.1:{port} (")
    assert replication(home, port, online=False) == CheckResult(
        CHECK, "skip", f"offline checks only; the gateway at http://127.0.0.1:{port} not asked")
