"""The central stack (deploy/central/compose.yaml) and two device containers
(deploy/device/Dockerfile) on a real Docker engine, driven by the Python Docker SDK.

Images build from a Debian base made on this machine (debootstrap + docker import), so
nothing comes from a registry; every container uses host networking on loopback. The
central Redis and the controller come up with compose; `fleet provision` makes each
device its ACL user; `fleet apply --wait` rolls a revision (a model mounted read-only
into the devices) out to two device containers running `edgebundle agent --serve` as
the user edge on a read-only root with their state in a volume. A chat on one is read
on the other; a device container and the Redis container killed with SIGKILL come back
by their restart policy, and no acknowledged message is lost. doctor inside a device
reports the container's memory limit, read-only root and state volume.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.containers import (
    BASE_IMAGE,
    COMPOSE_FILE,
    DEVICE_IMAGE,
    REDIS_IMAGE,
    REPO,
    build_base,
    build_image,
    build_wheels,
    compose_command,
    docker_client,
    wait_for,
)
from tests.support.processes import free_port
from tests.support.tls import make_test_ca

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

FLEET = "shops"
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
REPLY = "Hello from the container"
STATE = "/var/lib/edgebundle"


def edgebundle(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def client() -> Any:
    return docker_client()


@pytest.fixture(scope="module")
def images(client: Any) -> dict[str, float]:
    """The base, device and central Redis images (cached layers: seconds when nothing
    changed); the seconds each build took."""
    started = time.monotonic()
    build_base()
    build_wheels()
    times = {"base+wheels": time.monotonic() - started}
    times["device"] = build_image(client, "deploy/device/Dockerfile", DEVICE_IMAGE, REPO,
                                  WASMEDGE="no")
    times["redis"] = build_image(client, "Dockerfile", REDIS_IMAGE,
                                 REPO / "deploy" / "central" / "redis")
    print(f"container images built in {times}", file=sys.stderr)
    return times


class Central:
    """`docker compose up` of deploy/central/compose.yaml, as its own project."""

    def __init__(self, client: Any, **env: str) -> None:
        self.client = client
        self.port = free_port()
        self.project = f"ebtest{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "REDIS_ADMIN_PASSWORD": ADMIN_PASSWORD,
                    "EDGEBUNDLE_FLEET": FLEET, "REDIS_PORT": str(self.port),
                    "BASE": BASE_IMAGE, "DEVICE_IMAGE": DEVICE_IMAGE,
                    "CENTRAL_REDIS_IMAGE": REDIS_IMAGE, **env}
        self.admin_url = f"redis://admin:{ADMIN_PASSWORD}@127.0.0.1:{self.port}/0"

    def compose(self, *args: str) -> None:
        result = subprocess.run([*compose_command(), "-f", str(COMPOSE_FILE), "-p",
                                 self.project, *args], env=self.env, capture_output=True,
                                text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout + result.stderr

    def container(self, service: str) -> Any:
        found = self.client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project}",
            f"com.docker.compose.service={service}"]})
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def central(client: Any, images: dict[str, float]) -> Iterator[Central]:
    stack = Central(client)
    stack.compose("up", "-d", "--no-build")
    try:
        wait_for(lambda: redis_ping(stack.port), 60, "the central Redis")
        yield stack
    finally:
        stack.compose("down", "-v", "--timeout", "5")


def redis_ping(port: int, **tls: Any) -> bool:
    import redis as redis_py
    connection = redis_py.Redis(port=port, username="admin", password=ADMIN_PASSWORD,
                                socket_timeout=2, **tls)
    try:
        return bool(connection.ping())
    finally:
        connection.close()


def central_keys(port: int) -> list[str]:
    import redis as redis_py
    connection = redis_py.Redis(port=port, username="admin", password=ADMIN_PASSWORD,
                                socket_timeout=2, decode_responses=True)
    try:
        return sorted(str(k) for k in connection.keys("*"))
    finally:
        connection.close()


class DeviceContainer:
    def __init__(self, client: Any, device_id: str, redis_url: str, models: Path,
                 label: str) -> None:
        self.id = device_id
        self.port = free_port()
        self.volume = client.volumes.create(f"ebtest-{device_id}-{uuid.uuid4().hex[:6]}")
        self.container = client.containers.run(
            DEVICE_IMAGE, ["--fleet", FLEET, "--device-id", device_id,
                           "--redis-url", redis_url, "--label", label],
            name=f"ebtest-{device_id}-{uuid.uuid4().hex[:6]}", detach=True,
            network_mode="host", environment={"EDGEBUNDLE_PORT": str(self.port)},
            volumes={self.volume.name: {"bind": STATE, "mode": "rw"},
                     str(models): {"bind": "/models", "mode": "ro"}},
            read_only=True, tmpfs={"/tmp": "mode=1777"}, mem_limit="2g",
            restart_policy={"Name": "always"})
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def healthy(self) -> bool:
        return self.http.get("/healthz").status_code == 200

    def logs(self) -> str:
        return str(self.container.logs(tail=60).decode(errors="replace"))

    def remove(self) -> None:
        self.http.close()
        try:
            self.container.remove(force=True)
        finally:
            self.volume.remove(force=True)


def kill_main_process(container: Any) -> int:
    """SIGKILL the container's main process from the host, as a crash or the OOM killer
    would (``docker kill`` counts as a manual stop, which a restart policy respects);
    from a container in the host's PID namespace when dockerd's is not ours. Returns
    the restart count before."""
    container.reload()
    before = int(container.attrs["RestartCount"])
    pid = int(container.attrs["State"]["Pid"])
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # dockerd in another PID namespace
        container.client.containers.run(BASE_IMAGE, ["bash", "-c", f"kill -9 {pid}"],
                                         pid_mode="host", network_mode="none", remove=True)
    return before


def restarted(container: Any, before: int) -> bool:
    container.reload()
    return int(container.attrs["RestartCount"]) > before and container.status == "running"


def manifest(model: Path, redis_port: int) -> str:
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    return (
        "apiVersion: edgebundle/v1\nkind: Fleet\n"
        f"metadata: {{name: {FLEET}}}\nspec:\n"
        f"  model: {{name: demo, url: \"file:///models/{model.name}\", sha256: {sha},"
        " template: llama-3-chat}\n"
        f"  sync: {{redis_url: \"redis://127.0.0.1:{redis_port}/0\"}}\n"
        "  rollout: {phases: [{percent: 100}], max_unavailable: \"100%\","
        " health: {window: 5s}, retries: 2}\n")


def thread_messages(device: DeviceContainer, thread: str) -> list[tuple[str, str]]:
    response = device.http.get(f"/v1/threads/{thread}")
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"]) for m in
            sorted(response.json()["messages"], key=lambda m: m["position"])]


def chat(device: DeviceContainer, thread: str, content: str) -> str:
    response = device.http.post("/v1/chat/completions", json={
        "thread_id": thread, "max_tokens": 32,
        "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_central_stack_and_two_device_containers_roll_out_chat_and_survive_kills(
        client: Any, central: Central, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir(mode=0o755)
    model = write_scripted_model(models / "demo.gguf", ScriptedModelSpec(reply=REPLY))
    model.chmod(0o644)
    (tmp_path / "fleet.yaml").write_text(manifest(model, central.port))

    provisioned = edgebundle("fleet", "provision", FLEET, "--device", "dev-a", "--device",
                             "dev-b", "--redis-url", central.admin_url, "--json",
                             "--out", str(tmp_path / "creds.json"))
    assert provisioned.returncode == 0, provisioned.stderr
    result = json.loads(provisioned.stdout)
    assert result["persisted"] is True  # the ACL file in the Redis volume keeps the users
    urls = {c["device_id"]: c["redis_url"] for c in result["provisioned"]}

    devices = [DeviceContainer(client, "dev-a", urls["dev-a"], models, "ring=canary"),
               DeviceContainer(client, "dev-b", urls["dev-b"], models, "ring=main")]
    try:
        applied = edgebundle("fleet", "apply", str(tmp_path / "fleet.yaml"), "--wait",
                             "--timeout", "300", "--redis-url", central.admin_url,
                             timeout=400)
        assert applied.returncode == 0, (applied.stdout + applied.stderr
                                         + "".join(d.logs() for d in devices))
        for device in devices:
            wait_for(device.healthy, 180, f"{device.id}'s /healthz")
        a, b = devices

        # the user, the read-only root, the state volume, the image's health check
        a.container.reload()
        assert a.container.attrs["Config"]["User"] == "edge"
        assert a.container.attrs["HostConfig"]["ReadonlyRootfs"] is True
        wait_for(lambda: (a.container.reload(), a.container.attrs["State"].get(
            "Health", {}).get("Status") == "healthy")[1], 120, "docker's health check")

        # a chat on A is read on B
        assert REPLY in chat(a, "kitchen", "hello from A")
        assert thread_messages(b, "kitchen") == [("user", "hello from A"),
                                                  ("assistant", REPLY)]

        # doctor inside the container reports the container's facts
        exit_code, output = a.container.exec_run(["edgebundle", "doctor", "--json"])
        report = {c["id"]: c for c in json.loads(output.decode())["checks"]}
        assert "(cgroup limit)" in report["host.memory"]["summary"]
        assert "2.0 GiB" in report["host.memory"]["summary"], report["host.memory"]
        disk = report["host.disk"]["summary"]
        assert "docker container (root read-only)" in disk and f"volume at {STATE}" in disk

        # a device container dies (SIGKILL): its restart policy brings it back
        before = kill_main_process(a.container)
        wait_for(lambda: restarted(a.container, before), 120, "dev-a's restart")
        wait_for(a.healthy, 180, "dev-a's /healthz after its restart")
        assert thread_messages(a, "kitchen")[-1] == ("assistant", REPLY)

        # the central Redis dies: back by its restart policy, from its append-only file
        redis_container = central.container("redis")
        keys_before = central_keys(central.port)
        before = kill_main_process(redis_container)
        wait_for(lambda: restarted(redis_container, before), 120, "Redis's restart")
        wait_for(lambda: redis_ping(central.port), 60, "Redis after its restart")
        try:
            wait_for(lambda: thread_messages(b, "kitchen") == [
                ("user", "hello from A"), ("assistant", REPLY)], 60, "the thread on B")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nbefore: {keys_before}\nafter: "
                                 f"{central_keys(central.port)}\n"
                                 f"{redis_container.logs(tail=30).decode()}") from None
        # the devices kept their ACL users (the ACL file), and chat goes on
        wait_for(lambda: REPLY in chat(b, "kitchen", "hello from B"), 120, "a turn on B")
        wait_for(lambda: thread_messages(a, "kitchen") == [
            ("user", "hello from A"), ("assistant", REPLY),
            ("user", "hello from B"), ("assistant", REPLY)], 60, "B's turn on A")
    finally:
        for device in devices:
            device.remove()


def test_the_central_redis_speaks_tls_only_when_given_a_certificate(
        client: Any, images: dict[str, float], tmp_path: Path) -> None:
    import redis as redis_py
    ca = make_test_ca(tmp_path / "ca")
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o755)
    for source, name in ((ca.server_cert, "server.crt"), (ca.server_key, "server.key")):
        (tls / name).write_bytes(source.read_bytes())
        (tls / name).chmod(0o644)  # the redis user of the image reads the bind mount
    stack = Central(client, REDIS_TLS_DIR=str(tls), REDIS_SCHEME="rediss")
    stack.compose("up", "-d", "--no-build", "redis")
    try:
        wait_for(lambda: redis_ping(stack.port, ssl=True, ssl_ca_certs=str(ca.ca_cert)), 60,
                 "the central Redis over TLS")
        with pytest.raises(redis_py.ConnectionError):
            redis_ping(stack.port)  # plain TCP: refused
        plain = redis_py.Redis(port=stack.port, ssl=True, ssl_ca_certs=str(ca.ca_cert),
                               socket_timeout=2)
        try:  # the default user is off: no command without a login
            with pytest.raises(redis_py.AuthenticationError):
                plain.get("x")
        finally:
            plain.close()
    finally:
        stack.compose("down", "-v", "--timeout", "5")
