"""A mirror round that began online never lands over a thread changed offline meanwhile.

The regression test of the race fixed in 9054af7 (edgebundle/sync/replication.py: a
per-thread lock held by local writes and by whatever replaces the copy, which checks
the thread is not dirty). Before it, a round that picked the threads to mirror while
online and then waited on the central Redis went on when the link came back and
replaced the copy of a thread the device had changed offline meanwhile; the heal then
sent nothing (/healthz: online, 0 pending) and every offline change was gone from
every device. tests/test_offline.py met it about one run in six; here it is certain.

Real parts only: a central redis-server, device A on it directly and device C through
a TCP proxy that *stalls* (connections stay open, nothing is forwarded) instead of
breaking, so a request C sent to the central Redis just before the stall waits,
unanswered (the client has no socket timeout), and is answered when the link is back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.devices import Device, messages_of, mirrored, sync_devices
from tests.support.redis_server import RedisServer
from tests.support.serving import wait_for
from tests.support.tcp_proxy import TcpProxy

REPLY = "Noted."


def turn(device: Device, thread: str, content: str, input_id: str) -> None:
    body = {"device_id": device.id, "input": {"id": input_id, "content": content},
            "stream": False, "params": {"max_tokens": 4}}
    answer = device.post(f"/v1/threads/{thread}/runs", body)
    assert answer.status_code == 200 and answer.json()["status"] == "completed", answer.text


def link(device: Device) -> dict[str, Any]:
    sync: dict[str, Any] = device.run.healthz().json()["sync"]
    return sync


def test_an_offline_change_survives_a_mirror_call_that_was_waiting_on_the_link(
        tmp_path: Path) -> None:
    central = RedisServer(tmp_path / "central", aof=True).start()
    proxy = TcpProxy(central.port).start()
    model = write_scripted_model(tmp_path / "m.gguf", ScriptedModelSpec(reply=REPLY))
    urls = [central.url, central.url.replace(f":{central.port}/", f":{proxy.port}/")]
    try:
        with sync_devices(urls, model, [tmp_path / "A", tmp_path / "C"], ids=("devA", "devC"),
                          extra_args=("--offline-after", "1")) as (a, c):
            thread = a.post("/v1/threads", {"id": "kiosk"}).json()["id"]
            turn(c, thread, "C before", "c-0")
            wait_for(lambda: mirrored(c, central, thread), timeout=30)

            proxy.stall()  # C's next mirror round waits on its central call ...
            wait_for(lambda: link(c)["link"] == "offline", timeout=30)
            turn(c, thread, "C offline", "c-off")  # ... while C takes a turn offline
            turn(a, thread, "A meanwhile", "a-1")  # and the central version moves on
            assert link(c)["pending"] == 2
            proxy.release()  # the link is back: the waiting call is answered

            wait_for(lambda: link(c) == {"link": "online", "pending": 0, "threads_pending": 0,
                                         "offline_since": None}, timeout=30, interval=0.2)
            time.sleep(1.5)  # a mirror round more: the copy is the central thread again
            questions = [m["content"] for m in messages_of(a, thread) if m["role"] == "user"]
            assert questions == ["C before", "A meanwhile", "C offline"]
    finally:
        proxy.stop()
        central.stop()
