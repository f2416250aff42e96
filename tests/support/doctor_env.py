"""Fabricated devices for doctor tests: lock files, installed runtimes, GGUF models.

Everything here is real files in tmp_path; the only double is the stand-in
``wasmedge`` (tests/support/standin_wasmedge.py), because WasmEdge cannot be
installed on these machines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgebundle.config import Settings
from edgebundle.doctor import Report, run_doctor
from edgebundle.fleet.manifest import Manifest
from edgebundle.fleet.manifest_file import device_target
from edgebundle.host import HostInfo
from edgebundle.pins import AppPins, RuntimeLock, load_app_pins, load_runtime_lock
from tests.support.standin_wasmedge import fake_libwasmedge, fake_plugin, write_standin

PLUGIN_LIB = "libwasmedgePluginWasiNN.so"
X86_64, AARCH64 = 0x3E, 0xB7
UNKNOWN = "unknown"


def write_lock(
    directory: Path,
    wasmedge_version: str = "0.14.1",
    plugin_build: str = "b5593",
    reported_version: str | None = None,
) -> RuntimeLock:
    """A real lock file (parsed by the real loader) pinning the given versions."""
    reported = f'reported_version = "{reported_version}"\n' if reported_version else ""
    text = f"""schema = 1
[wasmedge]
version = "{wasmedge_version}"
[plugin]
name = "wasi_nn"
library = "{PLUGIN_LIB}"
version = "{wasmedge_version}"
build = "{plugin_build}"
{reported}
[[asset]]
component = "wasmedge"
os = "linux"
arch = "x86_64"
url = "https://example.invalid/WasmEdge-{wasmedge_version}-ubuntu20.04_x86_64.tar.gz"
sha256 = "unknown"
"""
    path = directory / "wasmedge.lock.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return load_runtime_lock(path)


def write_app_pins(directory: Path, apps: tuple[tuple[str, str, str, str], ...] = ()) -> AppPins:
    """A real wasm/pins.toml with rows (name, version, url filename, sha256)."""
    rows = "".join(
        f"""
[[app]]
name = "{name}"
version = "{version}"
kind = "llama-api-server"
url = "https://example.invalid/{version}/{filename}"
sha256 = "{sha}"
"""
        for name, version, filename, sha in apps
    )
    path = directory / "pins.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("schema = 1\n" + rows, encoding="utf-8")
    return load_app_pins(path)


def host(
    arch: str = "x86_64", flags: str = "fpu sse2 avx avx2", os_name: str = "linux"
) -> HostInfo:
    return HostInfo(os=os_name, arch=arch, flags=frozenset(flags.split()))


def install_runtime(
    home: Path,
    version: str = "0.14.1",
    plugin_version: str = "0.14.1.0",
    variant: str | None = "cpu",
    plugin_build: str = "b5593",
    machine: int = X86_64,
    with_plugin: bool = True,
    host_machine: int = X86_64,
) -> Path:
    """``<home>/runtime/wasmedge-<v>-<variant>`` as install.sh lays it out, ``current`` -> it.

    ``machine`` is the plugin's, ``host_machine`` the one the stand-in wasmedge runs on
    (it loads only plugins for it, as dlopen does). ``variant=None`` leaves out the
    installer's marker file.
    """
    prefix = home / "runtime" / f"wasmedge-{version}-{variant or 'unknown'}"
    write_standin(prefix / "bin" / "wasmedge", version=version, plugin_version=plugin_version,
                  machine=host_machine)  # fmt: skip
    fake_libwasmedge(prefix / "lib", machine=host_machine)
    (prefix / "plugin").mkdir(parents=True, exist_ok=True)
    if with_plugin:
        fake_plugin(prefix / "plugin" / PLUGIN_LIB, machine=machine)
    if variant is not None:
        marker = {
            "wasmedge_version": version,
            "plugin_version": version,
            "plugin_build": plugin_build,
            "variant": variant,
            "os": "linux",
            "arch": "x86_64",
        }
        (prefix / "edgebundle-runtime.json").write_text(json.dumps(marker), encoding="utf-8")
    current = home / "runtime" / "current"
    if current.is_symlink():
        current.unlink()
    current.symlink_to(prefix.name)
    return prefix


def path_wasmedge(root: Path, version: str = "0.14.1", plugin_version: str = "0.14.1.0") -> Path:
    """A wasmedge on PATH in ``root/bin`` with its library in ``root/lib``, so its default
    plugin directory is ``root/lib/../plugin`` (outside /usr)."""
    fake_libwasmedge(root / "lib")
    return write_standin(root / "bin" / "wasmedge", version=version, plugin_version=plugin_version)


def environ(path_dirs: tuple[Path, ...] = (), **extra: str) -> dict[str, str]:
    """A controlled environment: PATH holds only the given dirs and the system's."""
    env = {"PATH": os.pathsep.join([*(str(p) for p in path_dirs), "/usr/bin", "/bin"])}
    env.update(extra)
    return env


def write_meminfo(directory: Path, total_kib: int, available_kib: int) -> Path:
    path = directory / "meminfo"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"MemTotal:       {total_kib} kB\nMemFree:        {available_kib} kB\n"
        f"MemAvailable:   {available_kib} kB\n",
        encoding="utf-8",
    )
    return path


def write_gguf(path: Path, n_embd: int = 64, n_tensors: int = 2) -> Path:
    """A real (tiny) GGUF file written by the reference ``gguf`` package."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>", "hello"])
    for i in range(n_tensors):
        writer.add_tensor(f"blk.{i}.weight", np.full((4, n_embd), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wasm(path: Path, body: bytes = b"\x01\x00\x00\x00") -> tuple[Path, str]:
    """A minimal WebAssembly module file and its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\0asm" + body
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def statuses(report_json: Mapping[str, object]) -> dict[str, str]:
    checks = report_json["checks"]
    assert isinstance(checks, list)
    return {c["id"]: c["status"] for c in checks}


def diagnose(
    home: Path,
    *,
    runtime: str | None = None,
    host_info: HostInfo | None = None,
    env: Mapping[str, str] | None = None,
    lock: RuntimeLock | None = None,
    app_pins: AppPins | None = None,
    online: bool = False,
    meminfo: Path | None = None,
    manifest: Manifest | None = None,
    central_redis: bool = False,
    cgroup_root: Path | None = None,
    root: Path | None = None,
    mountinfo: Path | None = None,
    **settings: object,
) -> Report:
    """run_doctor on a fabricated device below ``home`` (pins written next to it); by
    default no memory cgroup limit, no container, no mount table."""
    pins_dir = home.parent / "pins"
    return run_doctor(
        Settings(home=home, **settings),  # type: ignore[arg-type]
        runtime=runtime,
        host=host_info or host(),
        environ=environ() if env is None else env,
        online=online,
        lock=lock or write_lock(pins_dir),
        app_pins=app_pins or write_app_pins(pins_dir),
        meminfo=meminfo or write_meminfo(pins_dir, 8 * 1024 * 1024, 6 * 1024 * 1024),
        target=device_target(manifest, settings.get("device_id")  # type: ignore[arg-type]
                             ) if manifest is not None else None,
        central_redis=central_redis,
        cgroup_root=cgroup_root or pins_dir / "no-cgroup",
        root=root or pins_dir / "no-root",
        mountinfo=mountinfo or pins_dir / "no-mountinfo",
    )
