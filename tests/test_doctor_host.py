"""host.* and runtime.embedded checks on fabricated machines (HostInfo, /proc/meminfo files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebundle.doctor import runtime_checks
from edgebundle.doctor.host_checks import disk_status
from edgebundle.doctor.sizes import GIB, MIB
from tests.support.doctor_env import (
    diagnose,
    host,
    install_runtime,
    path_wasmedge,
    write_gguf,
    write_meminfo,
)
from tests.support.doctor_env import environ as make_env

NO_AVX = "fpu sse sse2 ssse3 sse4_1 sse4_2"

# -- host.cpu -----------------------------------------------------------------------


def test_cpu_without_avx_and_the_cpu_plugin_fails(home: Path) -> None:
    install_runtime(home, variant="cpu")
    check = diagnose(home, runtime="wasmedge", host_info=host(flags=NO_AVX)).check("host.cpu")
    assert check.status == "fail"
    assert "the cpu plugin needs AVX: expect 'Illegal instruction'" in check.summary
    assert check.fix == "reinstall with ./install.sh --variant noavx"


def test_cpu_without_avx_and_the_noavx_plugin_passes(home: Path) -> None:
    install_runtime(home, variant="noavx")
    check = diagnose(home, runtime="wasmedge", host_info=host(flags=NO_AVX)).check("host.cpu")
    assert check.status == "ok"
    assert "no avx" in check.summary and "noavx plugin" in check.summary


def test_cpu_with_avx2_and_the_cpu_plugin_passes(home: Path) -> None:
    install_runtime(home, variant="cpu")
    check = diagnose(home, runtime="wasmedge", host_info=host(flags="sse2 avx avx2")).check(
        "host.cpu"
    )
    assert check.status == "ok"
    assert check.summary.startswith("x86_64, ") and ", avx2; llama.cpp threads " in check.summary


def test_cpu_without_avx_and_an_unknown_plugin_variant_warns(home: Path, tmp_path: Path) -> None:
    binary = path_wasmedge(tmp_path / "usr")
    env = make_env((binary.parent,))
    check = diagnose(home, runtime="wasmedge", env=env, host_info=host(flags=NO_AVX)).check(
        "host.cpu"
    )
    assert check.status == "warn"
    assert "cannot be told" in check.summary


def test_cuda_plugin_without_the_cuda_runtime_fails(home: Path) -> None:
    install_runtime(home, variant="cuda-12")
    check = diagnose(home, runtime="wasmedge", host_info=host()).check("host.cpu")
    assert check.status == "fail"
    assert "libcudart.so.12" in check.summary


def test_arm_host_reports_its_features(home: Path) -> None:
    check = diagnose(home, host_info=host("aarch64", "fp asimd crc32")).check("host.cpu")
    assert check.status == "ok"
    assert check.summary.startswith("aarch64, ") and ", asimd; llama.cpp threads " in check.summary


# -- host.memory --------------------------------------------------------------------


def _model(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "model.gguf", n_embd=1024)  # ~33 KiB of tensor data


def test_memory_smaller_than_the_model_fails(home: Path, tmp_path: Path) -> None:
    model = _model(tmp_path)
    size_kib = model.stat().st_size // 1024
    meminfo = write_meminfo(tmp_path / "m", 4 * 1024 * 1024, size_kib - 2)
    check = diagnose(home, model=model, meminfo=meminfo).check("host.memory")
    assert check.status == "fail"
    assert "does not fit" in check.summary


def test_memory_with_little_headroom_warns(home: Path, tmp_path: Path) -> None:
    model = _model(tmp_path)
    size_kib = model.stat().st_size // 1024
    meminfo = write_meminfo(tmp_path / "m", 4 * 1024 * 1024, int(size_kib * 1.1))
    check = diagnose(home, model=model, meminfo=meminfo).check("host.memory")
    assert check.status == "warn"


def test_enough_memory_passes(home: Path, tmp_path: Path) -> None:
    model = _model(tmp_path)
    meminfo = write_meminfo(tmp_path / "m", 4 * 1024 * 1024, 2 * 1024 * 1024)
    check = diagnose(home, model=model, meminfo=meminfo).check("host.memory")
    assert check.status == "ok"
    assert check.summary.startswith("2.0 GiB available of 4.0 GiB; model ")


def test_unreadable_meminfo_is_skipped(home: Path, tmp_path: Path) -> None:
    check = diagnose(home, meminfo=tmp_path / "no-such-meminfo").check("host.memory")
    assert check.status == "skip"


def test_a_cgroup_memory_limit_is_the_memory_doctor_counts(home: Path, tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{GIB}\n")  # docker run --memory 1g (cgroup v2)
    (cgroup / "memory.current").write_text(f"{256 * MIB}\n")
    meminfo = write_meminfo(tmp_path / "m", 8 * 1024 * 1024, 6 * 1024 * 1024)
    check = diagnose(home, meminfo=meminfo, cgroup_root=cgroup).check("host.memory")
    assert check.status == "ok"
    assert check.summary == "768.0 MiB available of 1.0 GiB (cgroup limit)"


def test_cgroup_v1_without_a_limit_leaves_meminfo(home: Path, tmp_path: Path) -> None:
    v1 = tmp_path / "cgroup" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    meminfo = write_meminfo(tmp_path / "m", 4 * 1024 * 1024, 2 * 1024 * 1024)
    check = diagnose(home, meminfo=meminfo, cgroup_root=v1.parent).check("host.memory")
    assert check.summary == "2.0 GiB available of 4.0 GiB"


# -- host.disk ----------------------------------------------------------------------


def test_disk_thresholds() -> None:
    assert disk_status(50 * MIB) == "fail"
    assert disk_status(500 * MIB) == "warn"
    assert disk_status(2 * GIB) == "ok"


def test_disk_reports_free_space_under_home(home: Path) -> None:
    check = diagnose(home).check("host.disk")
    assert check.status in ("ok", "warn", "fail")
    assert f"free under {home}" in check.summary


# -- runtime.embedded ---------------------------------------------------------------


def test_embedded_runtime_missing_fails_when_run_would_use_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_checks, "EMBEDDED_MODULE", "edgebundle.runtime.not_there")
    monkeypatch.setitem(runtime_checks.REQUIREMENTS, "no_such_pkg_xyz", "no-such-pkg-xyz")
    report = diagnose(home, runtime="auto")
    check = report.check("runtime.embedded")
    assert report.runtime == "embedded"
    assert check.status == "fail"
    assert "no embedded runtime" in check.summary and "no-such-pkg-xyz" in check.summary


def test_embedded_runtime_missing_only_warns_when_wasmedge_is_used(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_checks, "EMBEDDED_MODULE", "edgebundle.runtime.not_there")
    install_runtime(home)
    assert diagnose(home, runtime="auto").check("runtime.embedded").status == "warn"
    assert diagnose(home, runtime="wasmedge").check("runtime.embedded").status == "skip"


def test_embedded_runtime_present_passes(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed modules stand in for wasmtime, llama_cpp and the next issue's runtime."""
    monkeypatch.setattr(runtime_checks, "EMBEDDED_MODULE", "edgebundle.runtime.wasmedge")
    monkeypatch.setattr(runtime_checks, "REQUIREMENTS", {"click": "click", "redis": "redis"})
    check = diagnose(home, runtime="embedded").check("runtime.embedded")
    assert check.status == "ok"


def _container_root(tmp_path: Path, *mounts: str) -> tuple[Path, Path]:
    root = tmp_path / "root"
    root.mkdir()
    (root / ".dockerenv").touch()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("".join(f"{n} 1 0:{n} / {point} rw - overlay overlay rw\n"
                                 for n, point in enumerate(("/", *mounts), start=20)))
    return root, mountinfo


def test_disk_in_a_container_names_the_state_volume(home: Path, tmp_path: Path) -> None:
    root, mountinfo = _container_root(tmp_path, str(home.parent), str(home))
    check = diagnose(home, root=root, mountinfo=mountinfo).check("host.disk")
    assert check.summary.endswith(
        f"; in a docker container (root writable), state on the volume at {home}")


def test_disk_in_a_container_without_a_state_volume_says_so(home: Path, tmp_path: Path) -> None:
    root, mountinfo = _container_root(tmp_path)
    check = diagnose(home, root=root, mountinfo=mountinfo).check("host.disk")
    assert "in a docker container (root writable), state in the container's own layer" \
        f" (mount a volume at {home} to keep it)" in check.summary
