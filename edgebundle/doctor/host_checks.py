"""Checks of the machine itself: CPU features for the plugin variant, memory, disk.

The GGML plugin's default x86 builds use AVX; on a CPU without it they die with
"Illegal instruction" on the first model load, so the installed variant (recorded by
install.sh in the runtime's marker file) is compared with the CPU's flags. The
summary names the llama.cpp threads ``run`` sends the plugin (``threads``, default the
CPUs this process may use): genuine WasmEdge's plugin would otherwise run 4.
"""

from __future__ import annotations

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.doctor.sizes import GIB, KIB, MIB, human_bytes
from edgebundle.host import (
    cgroup_memory,
    container_facts,
    cpu_count,
    disk_free_bytes,
    memory_kib,
    usable_cpus,
)

CPU, MEMORY, DISK = "host.cpu", "host.memory", "host.disk"
DISK_WARN_BYTES = 1 * GIB
DISK_FAIL_BYTES = 100 * MIB
MEMORY_HEADROOM = 1.2  # model bytes x this = comfortable (KV cache, runtime, the OS)
_X86_FEATURES = ("avx512f", "avx2", "avx")
_ARM_FEATURES = ("sve", "asimd", "neon")


def checks(ctx: Context) -> list[CheckResult]:
    return [_cpu(ctx), _memory(ctx), _disk(ctx)]


def _cpu(ctx: Context) -> CheckResult:
    host = ctx.host
    features = _X86_FEATURES if host.arch == "x86_64" else _ARM_FEATURES
    best = next((f for f in features if f in host.flags), None)
    if host.arch == "x86_64" and best is None:
        best = "no avx"
    usable = usable_cpus()
    threads = ctx.settings.threads or usable
    source = "threads setting" if ctx.settings.threads else f"{usable} usable CPUs"
    summary = ", ".join(x for x in (host.arch, f"{cpu_count()} cores", best) if x)
    summary += f"; llama.cpp threads {threads} ({source})"
    marker = ctx.marker if ctx.uses_wasmedge else None
    variant = marker.variant if marker is not None else None
    reinstall = "reinstall with ./install.sh --variant {}"
    if variant is not None and variant.startswith("cuda") and not host.cuda12:
        return fail(
            CPU,
            f"{summary}; the {variant} plugin is installed but the CUDA 12 runtime "
            "(libcudart.so.12) is not found",
            "install the CUDA 12 runtime, or " + reinstall.format("cpu"),
        )
    if host.arch != "x86_64" or host.has_avx:
        return ok(CPU, summary)
    if variant is not None and variant != "noavx":
        return fail(
            CPU,
            f"{summary}: the {variant} plugin needs AVX: expect 'Illegal instruction'",
            reinstall.format("noavx"),
        )
    if variant == "noavx":
        return ok(CPU, f"{summary}; noavx plugin installed")
    if ctx.uses_wasmedge and ctx.setup is not None:
        return warn(
            CPU,
            f"{summary}: which plugin variant {ctx.setup.binary} uses cannot be told "
            "(not installed by install.sh); any but noavx dies with 'Illegal instruction'",
            reinstall.format("noavx"),
        )
    return ok(CPU, summary)


def _memory(ctx: Context) -> CheckResult:
    mem = memory_kib(ctx.meminfo)
    if mem is None:
        return skip(MEMORY, f"memory size unknown ({ctx.meminfo} not readable)")
    total, available = mem[0] * KIB, mem[1] * KIB
    limited = cgroup_memory(ctx.cgroup_root)
    if limited is not None and limited[0] < total:  # a container's --memory, a systemd slice
        limit, usage = limited
        total, available = limit, max(0, min(available, limit - usage))
        summary = f"{human_bytes(available)} available of {human_bytes(total)} (cgroup limit)"
    else:
        summary = f"{human_bytes(available)} available of {human_bytes(total)}"
    model = ctx.settings.model
    try:
        model_size = model.stat().st_size if model is not None and model.is_file() else None
    except OSError:
        model_size = None
    if model_size is None:
        return ok(MEMORY, summary)
    summary += f"; model {human_bytes(model_size)}"
    fix = "close other programs, add memory or swap, or use a smaller (more quantized) model"
    if available < model_size:
        return fail(MEMORY, f"{summary}: the model does not fit in available memory", fix)
    if available < model_size * MEMORY_HEADROOM:
        return warn(
            MEMORY, f"{summary}: under {MEMORY_HEADROOM:g}x the model size; expect swapping", fix
        )
    return ok(MEMORY, summary)


def disk_status(free: int) -> str:
    if free < DISK_FAIL_BYTES:
        return "fail"
    if free < DISK_WARN_BYTES:
        return "warn"
    return "ok"


def _disk(ctx: Context) -> CheckResult:
    home = ctx.layout.home
    try:
        free = disk_free_bytes(home)
    except OSError as exc:
        return skip(DISK, f"cannot tell free space under {home}: {exc.strerror or exc}")
    summary = f"{human_bytes(free)} free under {home}"
    fix = f"free space on the file system holding {home} (models and downloads go there)"
    status = disk_status(free)
    container = container_facts(home, ctx.environ, ctx.root, ctx.mountinfo)
    if container is not None:
        root_fs = "read-only" if container.root_read_only else "writable"
        if container.state_mount is None:
            summary += (f"; in a {container.engine} container (root {root_fs}), state in"
                        f" the container's own layer (mount a volume at {home} to keep it)")
        else:
            summary += (f"; in a {container.engine} container (root {root_fs}),"
                        f" state on the volume at {container.state_mount}")
    if status == "fail":
        return fail(DISK, f"{summary}: below {human_bytes(DISK_FAIL_BYTES)}", fix)
    if status == "warn":
        return warn(DISK, f"{summary}: below {human_bytes(DISK_WARN_BYTES)}", fix)
    return ok(DISK, summary)
