"""Runtime installation: versioned dirs, the `current` link, the env file, fallback.

GitHub releases are unreachable here, so a local HTTP server on 127.0.0.1 serves
fabricated release archives (tests/support/release_server.py) whose `wasmedge` is the
stand-in script (a test double at the process boundary). Everything else is real:
downloads, sha256 checks, tar extraction, symlinks, bash sourcing the env file, and the
`edgebundle` CLI run as a subprocess for exit codes and messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgebundle import installer
from edgebundle.errors import (
    ChecksumMismatchError,
    DownloadError,
    InstallError,
    PinError,
    UnverifiedPinError,
)
from edgebundle.host import HostInfo, detect
from edgebundle.layout import Layout
from edgebundle.pins import load_runtime_lock
from tests.support.release_server import (
    ReleaseServer,
    closed_port_url,
    make_evil_archive,
    make_plugin_archive,
    make_runtime_archive,
    publish_release,
    repin,
    sha256,
)

HOST = detect()
AVX_HOST = HostInfo(os=HOST.os, arch=HOST.arch, flags=frozenset({"avx", "avx2"}))


class Lines(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


def run_install(
    lock: Path, pins: Path, home: Path, **options: object
) -> tuple[installer.InstallResult, Lines]:
    log = Lines()
    plan = installer.make_plan(AVX_HOST, lock_file=lock, pins_file=pins, **options)  # type: ignore[arg-type]
    return installer.install(plan, Layout(home), log=log), log


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    return subprocess.run(
        [sys.executable, "-m", "edgebundle", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def runtime_entries(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "runtime").iterdir())


def test_install_end_to_end(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    home = tmp_path / "my 'home"  # quoting in the env file must hold
    result, _ = run_install(release.lock, release.pins, home)
    layout = Layout(home)
    assert result.runtime == "wasmedge" and result.active == "wasmedge-0.14.1-cpu"
    assert os.readlink(layout.runtime_current) == "wasmedge-0.14.1-cpu"
    marker = json.loads((layout.runtime_current / "edgebundle-runtime.json").read_text())
    assert marker["wasmedge_version"] == "0.14.1" and marker["plugin_build"] == "b0001"
    assert marker["variant"] == "cpu" and (marker["os"], marker["arch"]) == (HOST.os, HOST.arch)
    assert marker["assets"]["wasmedge"]["sha256"] == sha256(release.runtime)
    assert marker["assets"]["plugin"]["url"] == release_server.url(release.plugin.name)
    assert (layout.runtime_current / "lib" / "libwasmedge.so.0").is_file()
    assert runtime_entries(home) == ["current", "wasmedge-0.14.1-cpu"]  # no temp leftovers

    script = (
        '. "$1" && wasmedge --version && echo "LD=$LD_LIBRARY_PATH" '
        '&& echo "PP=$WASMEDGE_PLUGIN_PATH"'
    )
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(layout.env_file)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    plugin = layout.runtime_current / "plugin" / "libwasmedgePluginWasiNN.so"
    assert "version 0.14.1" in out.stdout
    assert f'{plugin} (plugin "wasi_nn") version 0.14.1.0' in out.stdout
    assert f"LD={layout.runtime_current / 'lib'}" in out.stdout
    assert f"PP={layout.runtime_current / 'plugin'}" in out.stdout


def test_rerun_is_idempotent_and_downloads_nothing(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(release_server, tmp_path)
    home = tmp_path / "home"
    first, _ = run_install(release.lock, release.pins, home, apps=["llama-chat"], models=["tiny"])
    requests = len(release_server.gets())
    again, log = run_install(release.lock, release.pins, home, apps=["llama-chat"], models=["tiny"])
    assert len(release_server.gets()) == requests
    assert first.unpacked and not again.unpacked and again.downloaded == ()
    assert again.active == "wasmedge-0.14.1-cpu"
    assert any("already installed; activating it" in line for line in log)
    assert again.apps["llama-chat"].name == "llama-chat-0.14.1.wasm"
    assert again.models["tiny"].read_bytes().startswith(b"GGUF")


def test_checksum_mismatch_keeps_previous_runtime(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    good = publish_release(release_server, tmp_path, "0.14.1")
    run_install(good.lock, good.pins, home)
    bad = publish_release(release_server, tmp_path, "0.15.0", runtime_sha="0" * 64)
    with pytest.raises(
        ChecksumMismatchError, match=f"expected {'0' * 64}, got {sha256(bad.runtime)}"
    ):
        run_install(bad.lock, bad.pins, home, require_wasmedge=True)
    assert runtime_entries(home) == ["current", "wasmedge-0.14.1-cpu"]
    assert os.readlink(home / "runtime" / "current") == "wasmedge-0.14.1-cpu"
    result, log = run_install(bad.lock, bad.pins, home)
    assert result.runtime == "wasmedge" and result.active == "wasmedge-0.14.1-cpu"
    (line,) = log
    assert line.startswith("WasmEdge 0.15.0 not installed (sha256 mismatch")
    assert "continuing with the installed wasmedge-0.14.1-cpu" in line


def test_dropped_download_resumes_during_install(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(release_server, tmp_path)
    release_server.drop_after(release.runtime.name, 1000)
    result, _ = run_install(release.lock, release.pins, tmp_path / "home")
    assert result.active == "wasmedge-0.14.1-cpu"
    ranges = [r.range for r in release_server.gets(release.runtime.name)]
    assert ranges == [None, "bytes=1000-"]


def test_unknown_sha_is_refused_unless_allowed(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(release_server, tmp_path, known_sha=False)
    home = tmp_path / "home"
    result, log = run_install(release.lock, release.pins, home)
    assert result.runtime == "embedded" and result.active is None
    (line,) = log
    assert (
        "no published sha256 is pinned" in line and "continuing with the embedded runtime" in line
    )
    assert release_server.gets() == []  # refused before any byte was fetched
    assert "WASMEDGE_PLUGIN_PATH" not in (home / "env").read_text()
    with pytest.raises(UnverifiedPinError):
        run_install(release.lock, release.pins, home, require_wasmedge=True)

    result, log = run_install(release.lock, release.pins, home, allow_unverified=True)
    assert result.runtime == "wasmedge"
    assert any("installed unverified (sha256 " + sha256(release.runtime) in line for line in log)
    marker = json.loads((home / "runtime" / "current" / "edgebundle-runtime.json").read_text())
    assert marker["assets"]["wasmedge"]["sha256"] == sha256(release.runtime)


def test_unpinned_platform_falls_back(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path, platform=("linux", "riscv64"))
    result, log = run_install(release.lock, release.pins, tmp_path / "home")
    assert result.runtime == "embedded"
    assert "nothing pinned for this" in log[0]


def test_upgrade_then_rollback_switches_the_link(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    old = publish_release(release_server, tmp_path, "0.14.1")
    new = publish_release(release_server, tmp_path, "0.15.0")
    run_install(old.lock, old.pins, home)
    env_before = (home / "env").read_text()
    result, _ = run_install(new.lock, new.pins, home)
    assert result.active == "wasmedge-0.15.0-cpu"
    assert (home / "env").read_text() == env_before  # the env file names `current`, not a version

    listed = json.loads(cli(home, "runtime", "list", "--json").stdout)
    assert [(r["name"], r["active"]) for r in listed] == [
        ("wasmedge-0.14.1-cpu", False),
        ("wasmedge-0.15.0-cpu", True),
    ]
    done = cli(home, "runtime", "use", "0.14.1-cpu")
    assert done.returncode == 0, done.stderr
    assert os.readlink(home / "runtime" / "current") == "wasmedge-0.14.1-cpu"
    out = subprocess.run(
        ["bash", "-c", '. "$1" && wasmedge --version', "bash", str(home / "env")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert out.stdout.splitlines()[0].endswith("version 0.14.1")
    bad = cli(home, "runtime", "use", "9.9.9")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "edgebundle: error: no installed runtime named '9.9.9' (installed: wasmedge-0.14.1-cpu, "
        "wasmedge-0.15.0-cpu); see `edgebundle runtime list`"
    ]


def test_other_archive_layouts(release_server: ReleaseServer, tmp_path: Path) -> None:
    """0.15+ runtimes have no top directory and lib64/; some plugin archives use a dir."""
    release = publish_release(release_server, tmp_path, "0.15.0")
    flat = make_runtime_archive(tmp_path / "flat", "0.15.0", top_dir=False)
    with tarfile.open(flat) as tar:
        assert not any(n.startswith("WasmEdge-") for n in tar.getnames())
    release.runtime.write_bytes(flat.read_bytes())
    nested = make_plugin_archive(tmp_path / "nested", "0.15.0", in_dir=True)
    release.plugin.write_bytes(nested.read_bytes())
    repin(release.lock, release_server.root)
    result, _ = run_install(release.lock, release.pins, tmp_path / "home")
    current = tmp_path / "home" / "runtime" / "current"
    assert result.active == "wasmedge-0.15.0-cpu"
    assert (current / "bin" / "wasmedge").is_file()
    assert (current / "plugin" / "libwasmedgePluginWasiNN.so").is_file()


def test_unsafe_archive_is_refused(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    evil = make_evil_archive(tmp_path)
    release.runtime.write_bytes(evil.read_bytes())
    repin(release.lock, release_server.root)
    home = tmp_path / "home"
    with pytest.raises(InstallError, match=r"refusing archive entry '\.\./escaped\.txt'"):
        run_install(release.lock, release.pins, home, require_wasmedge=True)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert runtime_entries(home) == []


def test_variants(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    lock = load_runtime_lock(release.lock)
    with pytest.raises(PinError, match="variant 'cuda-12' is not pinned .* one of: cpu, noavx"):
        installer.resolve_variant(lock, AVX_HOST, "cuda-12")
    assert installer.resolve_variant(lock, AVX_HOST, "noavx") == "noavx"
    old_cpu = HostInfo(os=HOST.os, arch=HOST.arch, flags=frozenset({"sse4_2"}))
    assert installer.resolve_variant(lock, old_cpu, "auto") == "noavx"
    cuda_box = HostInfo(os=HOST.os, arch=HOST.arch, flags=frozenset({"avx"}), cuda12=True)
    assert installer.resolve_variant(lock, cuda_box, "auto") == "cpu"  # no cuda-12 pin here


# ---------------------------------------------------------------- the CLI


def test_cli_unreachable_download_falls_back(tmp_path: Path, release_server: ReleaseServer) -> None:
    release = publish_release(release_server, tmp_path)
    text = release.lock.read_text().replace(
        release_server.url(release.runtime.name), closed_port_url(release.runtime.name)
    )
    release.lock.write_text(text)
    home = tmp_path / "home"
    args = ["install", "--lock", str(release.lock), "--pins", str(release.pins)]
    done = cli(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runtime"] == "embedded"
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "WasmEdge 0.14.1 not installed (127.0.0.1 unreachable (connection refused))"
    )
    assert line.endswith("pass --require-wasmedge to make this an error")

    strict = cli(home, *args, "--require-wasmedge")
    assert strict.returncode == 1
    (line,) = strict.stderr.strip().splitlines()
    assert line.startswith("edgebundle: error: http://127.0.0.1:") and "connection refused" in line
    assert not (home / "runtime" / "current").exists()


def test_cli_install_summary_and_env(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    home = tmp_path / "home"
    done = cli(
        home,
        "install",
        "--lock",
        str(release.lock),
        "--pins",
        str(release.pins),
        "--variant",
        "noavx",
        "--app",
        "llama-chat",
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"runtime: wasmedge 0.14.1 (noavx), {home / 'runtime' / 'current'} -> wasmedge-0.14.1-noavx"
        in done.stdout
    )
    assert f"env file: {home / 'env'}" in done.stdout
    assert (home / "apps" / "llama-chat-0.14.1.wasm").is_file()


def test_cli_env_vars_name_the_lock(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env.update(
        EDGEBUNDLE_LOCK=str(release.lock),
        EDGEBUNDLE_PINS=str(release.pins),
        EDGEBUNDLE_HOME=str(tmp_path / "home"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "edgebundle", "install", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["active"] == "wasmedge-0.14.1-cpu"


def test_cli_malformed_lock_is_exit_2_one_line(tmp_path: Path) -> None:
    lock = tmp_path / "lock.toml"
    lock.write_text("schema = 1\n[wasmedge\nversion = 1\n")
    done = cli(tmp_path / "home", "install", "--lock", str(lock), "--pins", str(lock))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"edgebundle: error: {lock}: not valid TOML")
    assert not (tmp_path / "home" / "runtime").exists()


def test_cli_unknown_variant_is_exit_2(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    done = cli(
        tmp_path / "home",
        "install",
        "--lock",
        str(release.lock),
        "--pins",
        str(release.pins),
        "--variant",
        "cuda-13",
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"edgebundle: error: variant 'cuda-13' is not pinned for {HOST.os}/{HOST.arch} in "
        f"{release.lock}; use --variant auto or one of: cpu, noavx"
    ]
    assert release_server.gets() == []


def test_cli_unknown_app_is_exit_2(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    done = cli(
        tmp_path / "home",
        "install",
        "--lock",
        str(release.lock),
        "--pins",
        str(release.pins),
        "--app",
        "nope",
    )
    assert done.returncode == 2
    assert "no app pinned as 'nope' (pinned: llama-chat)" in done.stderr


def test_apps_fail_loudly_without_fallback(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path)
    (release_server.root / "llama-chat-0.14.1.wasm").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError):
        run_install(release.lock, release.pins, tmp_path / "home", apps=["llama-chat"])
    assert not (tmp_path / "home" / "apps" / "llama-chat-0.14.1.wasm").exists()


def test_download_error_type_for_missing_asset(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(release_server, tmp_path)
    release.plugin.unlink()
    with pytest.raises(DownloadError, match="HTTP 404"):
        run_install(release.lock, release.pins, tmp_path / "home", require_wasmedge=True)
    assert runtime_entries(tmp_path / "home") == []
