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
import re
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edgebundle import installer, resources
from edgebundle.download import EXTRA_CA_ENV
from edgebundle.errors import (
    ChecksumMismatchError,
    ChecksumSourceError,
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
    write_sha256sum,
)
from tests.support.tls import TestCA

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


def cli(
    home: Path, *args: str, extra_env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env.update(extra_env or {})
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


# ---------------------------------------------------------------- how each file is verified


def marker_of(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (home / "runtime" / "current" / "edgebundle-runtime.json").read_text()
    )
    return data


def test_a_pinned_archive_swapped_on_the_server_is_refused(
    https_release_server: ReleaseServer, tmp_path: Path
) -> None:
    """The pin wins: the release's SHA256SUM (which lists the swapped file) is not read."""
    release = publish_release(https_release_server, tmp_path)
    pinned = sha256(release.runtime)
    other = make_runtime_archive(tmp_path / "other", "0.14.1")  # same layout, other bytes
    release.runtime.write_bytes(other.read_bytes())
    write_sha256sum(https_release_server.root, {release.runtime.name: sha256(other)})
    home = tmp_path / "home"
    with pytest.raises(ChecksumMismatchError, match=f"expected {pinned}, got {sha256(other)}"):
        run_install(release.lock, release.pins, home, require_wasmedge=True)
    assert https_release_server.gets("SHA256SUM") == []
    assert runtime_entries(home) == []  # nothing unpacked, no temp leftovers
    assert not list((home / "downloads").iterdir())  # the download was discarded


def test_an_unpinned_asset_is_verified_against_sha256sum_and_recorded(
    https_release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(https_release_server, tmp_path, verify=["plugin"])
    home = tmp_path / "home"
    result, log = run_install(release.lock, release.pins, home, require_wasmedge=True)
    sums_url = https_release_server.url("SHA256SUM")
    assert result.active == "wasmedge-0.14.1-cpu"
    runtime, plugin = result.verified
    assert (runtime.file, runtime.how, runtime.source) == (
        release.runtime.name, "pinned", str(release.lock))
    assert (plugin.file, plugin.sha256, plugin.how, plugin.source) == (
        release.plugin.name, sha256(release.plugin), "release-sha256sum", sums_url)
    assert log[:2] == [
        f"{release.runtime.name}: sha256 {sha256(release.runtime)} pinned in {release.lock}",
        f"{release.plugin.name}: sha256 {sha256(release.plugin)} verified against the "
        f"publisher's {sums_url} (read now over https; not pinned)",
    ]
    recorded = marker_of(home)["assets"]
    assert recorded["plugin"] == {
        "url": https_release_server.url(release.plugin.name),
        "sha256": sha256(release.plugin),
        "verified_by": "release-sha256sum",
        "verified_with": sums_url,
    }
    assert recorded["wasmedge"]["verified_by"] == "pinned"
    # SHA256SUM is read once, before the first archive byte.
    paths = [r.path for r in https_release_server.gets()]
    assert paths == ["/SHA256SUM", f"/{release.runtime.name}", f"/{release.plugin.name}"]
    assert result.to_json()["verified"][1]["how"] == "release-sha256sum"

    again, _ = run_install(release.lock, release.pins, home)  # installed: nothing read again
    assert again.verified == () and len(https_release_server.gets()) == 3


@pytest.mark.parametrize(
    "breakage, reason",
    [
        ("missing", "HTTP 404 Not Found: the release publishes no SHA256SUM to verify {plugin}"),
        ("unlisted", "{sums} does not list {plugin}, so nothing published vouches for it"),
        ("to plain http", "redirected to {plain}, which is not https"),
    ],
)
def test_a_sha256sum_that_cannot_vouch_is_refused_before_any_download(
    https_release_server: ReleaseServer,
    release_server: ReleaseServer,
    tmp_path: Path,
    breakage: str,
    reason: str,
) -> None:
    release = publish_release(https_release_server, tmp_path, verify=["plugin"])
    sums = https_release_server.root / "SHA256SUM"
    plain = release_server.url("SHA256SUM")
    if breakage == "missing":
        sums.unlink()
    elif breakage == "unlisted":
        write_sha256sum(https_release_server.root, {release.runtime.name: sha256(release.runtime)})
    else:
        https_release_server.redirect("SHA256SUM", plain)
    reason = reason.format(
        plugin=release.plugin.name, sums=https_release_server.url("SHA256SUM"), plain=plain
    )
    home = tmp_path / "home"
    for allow_unverified in (False, True):  # a failed check is no "unknown" pin
        result, log = run_install(
            release.lock, release.pins, home, allow_unverified=allow_unverified
        )
        assert result.runtime == "embedded" and result.verified == ()
        (line,) = log
        assert reason in line and "continuing with the embedded runtime" in line
    with pytest.raises(ChecksumSourceError, match=re.escape(reason)):
        run_install(release.lock, release.pins, home, require_wasmedge=True)
    archives = [r for r in https_release_server.gets() if r.path.endswith(".tar.gz")]
    assert archives == [] and release_server.gets() == []
    assert not (home / "runtime").exists() or runtime_entries(home) == []


def test_a_download_that_differs_from_sha256sum_is_refused(
    https_release_server: ReleaseServer, tmp_path: Path
) -> None:
    release = publish_release(https_release_server, tmp_path, verify=["plugin"])
    listed = "5" * 64
    write_sha256sum(
        https_release_server.root,
        {release.runtime.name: sha256(release.runtime), release.plugin.name: listed},
    )
    home = tmp_path / "home"
    sums_url = https_release_server.url("SHA256SUM")
    with pytest.raises(ChecksumMismatchError) as caught:
        run_install(release.lock, release.pins, home, require_wasmedge=True)
    assert f"sha256 mismatch: {sums_url} lists {listed}, got {sha256(release.plugin)}" in str(
        caught.value
    )
    assert runtime_entries(home) == []


def test_verify_needs_https_in_the_lock(release_server: ReleaseServer, tmp_path: Path) -> None:
    release = publish_release(release_server, tmp_path, verify=["plugin"])
    done = cli(tmp_path / "home", "install", "--lock", str(release.lock), "--pins",
               str(release.pins))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"edgebundle: error: {release.lock}: asset[1].verify = 'release-sha256sum' needs an "
        "https:// url (its SHA256SUM is read from beside it, over TLS only)"
    )
    assert release_server.gets() == []


def test_allow_unverified_is_still_needed_for_a_pin_with_neither(
    https_release_server: ReleaseServer, tmp_path: Path
) -> None:
    """Runtime verifiable against SHA256SUM, plugin neither pinned nor verifiable."""
    release = publish_release(https_release_server, tmp_path, verify=["wasmedge"],
                              known_sha=False)
    home = tmp_path / "home"
    result, log = run_install(release.lock, release.pins, home)
    assert result.runtime == "embedded"
    (line,) = log
    assert (
        f"not installed ({release.plugin.name}: no published sha256 is pinned and the lock "
        "names no SHA256SUM to verify it against; pass --allow-unverified" in line
    )
    assert https_release_server.gets() == []  # refused before SHA256SUM or any archive

    result, log = run_install(release.lock, release.pins, home, allow_unverified=True)
    assert [v.how for v in result.verified] == ["release-sha256sum", "unverified"]
    assert log[1] == (
        f"WARNING: {release.plugin.name}: installed unverified (sha256 "
        f"{sha256(release.plugin)}); nothing published vouches for it (--allow-unverified)"
    )
    assert marker_of(home)["assets"]["plugin"]["verified_by"] == "unverified"


def test_cli_output_says_which_files_are_pinned_and_which_verified(
    https_release_server: ReleaseServer, test_ca: TestCA, tmp_path: Path
) -> None:
    release = publish_release(https_release_server, tmp_path, verify=["plugin"])
    home = tmp_path / "home"
    done = cli(home, "install", "--lock", str(release.lock), "--pins", str(release.pins),
               extra_env={EXTRA_CA_ENV: str(test_ca.ca_cert)})
    assert done.returncode == 0, done.stderr
    sums_url = https_release_server.url("SHA256SUM")
    assert done.stdout.splitlines()[1:3] == [
        f"  {release.runtime.name}: sha256 {sha256(release.runtime)} pinned in {release.lock}",
        f"  {release.plugin.name}: sha256 {sha256(release.plugin)} verified against the "
        f"publisher's {sums_url} (read now over https; not pinned)",
    ]
    as_json = cli(home, "install", "--lock", str(release.lock), "--pins", str(release.pins),
                  "--json", extra_env={EXTRA_CA_ENV: str(test_ca.ca_cert)})
    assert json.loads(as_json.stdout)["verified"] == []  # already installed: nothing fetched


# ---------------------------------------------------------------- the lock's rules


def lock_text(rows: str) -> str:
    return (
        'schema = 1\n[wasmedge]\nversion = "0.14.1"\n'
        '[plugin]\nname = "wasi_nn"\nlibrary = "libwasmedgePluginWasiNN.so"\n'
        'version = "0.14.1"\nbuild = "b5593"\n' + rows
    )


def row(component: str, dist: str, check: str, variant: str | None = None,
        arch: str = "x86_64") -> str:
    name = "WasmEdge-plugin-wasi_nn-ggml" if component == "plugin" else "WasmEdge"
    text = f'[[asset]]\ncomponent = "{component}"\nos = "linux"\narch = "{arch}"\n'
    text += f'variant = "{variant}"\n' if variant else ""
    text += f'dist = "{dist}"\n' if dist else ""
    return text + (
        f'url = "https://example.org/r/{name}-0.14.1-{dist or "x"}_{arch}.tar.gz"\n{check}\n'
    )


PINNED, VERIFY = f'sha256 = "{"a" * 64}"', 'verify = "release-sha256sum"'


@pytest.mark.parametrize(
    "rows, message",
    [
        (row("wasmedge", "", f'{PINNED}\n{VERIFY}'),
         "asset[0] has both sha256 and verify"),
        (row("wasmedge", "", ""), 'asset[0] needs sha256 = "<hex>" (a published value)'),
        (row("wasmedge", "", 'verify = "trust-me"'),
         "asset[0].verify is 'trust-me'; expected one of release-sha256sum"),
        (row("wasmedge", "manylinux2014", PINNED)
         + row("plugin", "ubuntu20.04", VERIFY, "cpu"),
         "plugin linux/x86_64 cpu is built for dist ubuntu20.04 but no WasmEdge asset of that "
         "dist is pinned for linux/x86_64 (pinned: manylinux2014); runtime and plugin must "
         "come from the same dist"),
        (row("wasmedge", "manylinux2014", PINNED) + row("wasmedge", "manylinux2014", VERIFY),
         "two WasmEdge assets for linux/x86_64 dist manylinux2014"),
        (row("wasmedge", "manylinux2014", PINNED).replace("manylinux2014_", "ubuntu20.04_"),
         "asset[0].dist is 'manylinux2014' but the file name in its url does not say "
         "-manylinux2014_<arch>"),
    ],
)
def test_lock_rules(tmp_path: Path, rows: str, message: str) -> None:
    lock = tmp_path / "lock.toml"
    lock.write_text(lock_text(rows))
    with pytest.raises(PinError, match=re.escape(f"{lock}: {message}")):
        load_runtime_lock(lock)


def test_each_variant_gets_the_runtime_of_its_dist(tmp_path: Path) -> None:
    lock = tmp_path / "lock.toml"
    lock.write_text(lock_text(
        row("wasmedge", "manylinux2014", PINNED) + row("wasmedge", "ubuntu20.04", VERIFY)
        + row("plugin", "manylinux2014", VERIFY + '\nbuild = "b3651"', "cpu")
        + row("plugin", "ubuntu20.04", 'sha256 = "unknown"', "noavx")
    ))
    pins = load_runtime_lock(lock)
    assert pins.runtime_for("linux", "x86_64", "cpu").dist == "manylinux2014"
    assert pins.runtime_for("linux", "x86_64", "noavx").dist == "ubuntu20.04"
    assert pins.plugin_build_for("linux", "x86_64", "cpu") == "b3651"
    assert pins.plugin_build_for("linux", "x86_64", "noavx") == "b5593"  # the lock's own
    verify_row = pins.runtime_asset("linux", "x86_64", "ubuntu20.04")
    assert (verify_row.verified, verify_row.checkable) == (False, True)
    assert verify_row.sha256sum_url == "https://example.org/r/SHA256SUM"


def test_the_shipped_lock(tmp_path: Path) -> None:
    """What is pinned (the published values, quoted), what is verified at install
    against the release's SHA256SUM, and what is neither."""
    lock = load_runtime_lock(resources.runtime_lock_file())
    release = "https://github.com/WasmEdge/WasmEdge/releases/download/0.14.1/"
    how = {
        a.filename: a.sha256 if a.verified else a.verify or "unknown" for a in lock.assets
    }
    assert how == {
        "WasmEdge-0.14.1-manylinux2014_x86_64.tar.gz":
            "a82f9fb01a6a6f1dfbd1cb069dc96d116f22c15cdb01207a5d0e65096055d092",
        "WasmEdge-0.14.1-manylinux2014_aarch64.tar.gz":
            "d5ac5c2405ff8a878558379740498e5fe4b126fe746eac585f7efa9bb7f32e28",
        "WasmEdge-0.14.1-darwin_arm64.tar.gz":
            "38dd10f4e78d339be91e0c3501055d4dad9bf08c3dc648e07a30df9bea2d6c4a",
        "WasmEdge-0.14.1-darwin_x86_64.tar.gz":
            "96d01cf083d4f7e1c55683dc4b60acca6d8517ad901e2d7b4b5d64ca9a6532e0",
        "WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz": "release-sha256sum",
        "WasmEdge-plugin-wasi_nn-ggml-0.14.1-manylinux2014_x86_64.tar.gz": "release-sha256sum",
        "WasmEdge-plugin-wasi_nn-ggml-0.14.1-manylinux2014_aarch64.tar.gz": "release-sha256sum",
        "WasmEdge-plugin-wasi_nn-ggml-noavx-0.14.1-ubuntu20.04_x86_64.tar.gz": "unknown",
        "WasmEdge-plugin-wasi_nn-ggml-cuda-0.14.1-ubuntu20.04_x86_64.tar.gz": "unknown",
        "WasmEdge-plugin-wasi_nn-ggml-0.14.1-darwin_arm64.tar.gz": "unknown",
    }
    for asset in lock.assets:
        if asset.verify:  # WasmEdge's own release, whose SHA256SUM sits beside the file
            assert asset.url == release + asset.filename
            assert asset.sha256sum_url == release + "SHA256SUM"
    # The default on a connected Linux box: both files of "cpu" are checkable, one dist.
    for arch in ("x86_64", "aarch64"):
        plugin = lock.plugin_asset("linux", arch, "cpu")
        runtime = lock.runtime_for("linux", arch, "cpu")
        assert plugin.checkable and runtime.verified
        assert plugin.dist == runtime.dist == "manylinux2014" and plugin.build == "b3651"
    for variant in ("noavx", "cuda-12"):  # ubuntu20.04-only plugins keep their runtime
        assert lock.runtime_for("linux", "x86_64", variant).dist == "ubuntu20.04"
