"""Facts about the device: OS, CPU architecture and features, CUDA, memory, disk.

Every probe reads from paths it is given (defaulting to the real ``/proc``), so tests
and doctor can describe a fabricated machine without patching globals.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROC_CPUINFO = Path("/proc/cpuinfo")
PROC_MEMINFO = Path("/proc/meminfo")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max …"
CGROUP_ROOT = Path("/sys/fs/cgroup")  # a container sees its own cgroup here
PROC_MOUNTINFO = Path("/proc/self/mountinfo")
# cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages); anything past
# 2^60 bytes is that
_NO_LIMIT = 1 << 60

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def normalize_arch(machine: str, os_name: str) -> str:
    """Arch names as release assets spell them: linux uses aarch64, darwin arm64."""
    arch = _ARCH_ALIASES.get(machine.lower(), machine.lower())
    if os_name == "darwin" and arch == "aarch64":
        return "arm64"
    return arch


def cpu_flags(cpuinfo: Path = PROC_CPUINFO) -> frozenset[str]:
    """CPU feature flags of the first processor ('flags' on x86, 'Features' on arm)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def memory_kib(meminfo: Path = PROC_MEMINFO) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in KiB, or None where /proc/meminfo is absent."""
    try:
        text = meminfo.read_text(encoding="utf-8")
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0])
    if "MemTotal" not in values:
        return None
    return values["MemTotal"], values.get("MemAvailable", values.get("MemFree", 0))


def has_cuda12() -> bool:
    """True when the CUDA 12 runtime library the cuda-12 plugin links against is loadable."""
    return ctypes.util.find_library("cudart") is not None and _cudart_major() == 12


def _cudart_major() -> int | None:
    for directory in ("/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"):
        path = Path(directory)
        if path.is_dir():
            for candidate in path.glob("libcudart.so.*"):
                major = candidate.name.split(".so.", 1)[1].split(".", 1)[0]
                if major.isdigit():
                    return int(major)
    return None


@dataclass(frozen=True)
class HostInfo:
    os: str
    arch: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cuda12: bool = False

    @property
    def has_avx(self) -> bool:
        return "avx" in self.flags

    def auto_variant(self) -> str:
        """The plugin variant this machine should run: cuda-12, cpu or noavx."""
        if self.os == "darwin":
            return "metal" if self.arch == "arm64" else "cpu"
        if self.arch == "x86_64":
            if self.cuda12:
                return "cuda-12"
            return "cpu" if self.has_avx else "noavx"
        return "cpu"


def detect(cpuinfo: Path = PROC_CPUINFO) -> HostInfo:
    os_name = platform.system().lower()
    return HostInfo(
        os=os_name,
        arch=normalize_arch(platform.machine(), os_name),
        flags=cpu_flags(cpuinfo),
        cuda12=os_name == "linux" and has_cuda12(),
    )


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def cpu_count() -> int:
    return os.cpu_count() or 1


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask (taskset, a container's
    cpuset), capped by its cgroup's CPU quota rounded up (docker --cpus 1.5 -> 2)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = cpu_count()
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
        if quota != "max" and int(period) > 0:
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def cgroup_memory(root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup when it has a limit (a
    container's ``--memory``), else None. cgroup v2 (``memory.max``,
    ``memory.current``) or v1 (``memory/memory.limit_in_bytes``, ``…usage_in_bytes``)."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            raw = (root / limit_file).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= _NO_LIMIT:
            return None
        try:
            usage = int((root / usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            usage = 0
        return int(raw), usage
    return None


@dataclass(frozen=True)
class Container:
    """What a process inside a container can tell about it."""

    engine: str  # docker, podman, or what $container says
    root_read_only: bool
    state_mount: str | None  # the mount point holding the home, None when it is /


def in_container(environ: Mapping[str, str], root: Path = Path("/")) -> str | None:
    """The container engine this process runs under, or None on a bare device."""
    if (root / ".dockerenv").exists():
        return "docker"
    if (root / "run" / ".containerenv").exists():
        return "podman"
    return environ.get("container") or None


def mount_point(path: Path, mountinfo: Path = PROC_MOUNTINFO) -> str | None:
    """The mount point (from /proc/self/mountinfo) that holds ``path``, or None."""
    try:
        lines = mountinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    target = str(path)
    best: str | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best)):
            best = point
    return best


def container_facts(home: Path, environ: Mapping[str, str], root: Path = Path("/"),
                    mountinfo: Path = PROC_MOUNTINFO) -> Container | None:
    engine = in_container(environ, root)
    if engine is None:
        return None
    try:
        read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    point = mount_point(probe.resolve(), mountinfo)
    return Container(engine=engine, root_read_only=read_only,
                     state_mount=None if point in (None, "/") else point)
