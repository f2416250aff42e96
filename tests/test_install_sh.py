"""install.sh end to end: a real venv, a real pip install, the runtime, a real offline bundle.

GitHub releases are unreachable here, so a local HTTPS server on 127.0.0.1 serves
fabricated WasmEdge archives and their release's SHA256SUM (tests/support/
release_server.py, with a throwaway CA the install trusts through
$EDGEBUNDLE_EXTRA_CA_FILE) and install.sh gets a --lock/--pins pointing at it; pip,
venv, bash and the bundle are real. These tests run
pip several times (about a minute in all): it is the only way to know install.sh works.
The one stand-in is the "old Python" (a script that reports 3.9), because no such
interpreter is installed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgebundle.download import EXTRA_CA_ENV
from tests.support.release_server import Release, ReleaseServer, publish_release, sha256
from tests.support.tls import TestCA

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "install.sh"


def run_sh(
    *args: str,
    home_dir: Path | None = None,
    timeout: float = 300,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env.update(extra_env or {})
    if home_dir is not None:  # a throwaway $HOME, so ~/.bashrc is the test's own
        env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
        env["HOME"] = str(home_dir)
    return subprocess.run(
        ["bash", str(INSTALL_SH), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA
) -> Iterator[tuple[ReleaseServer, Release]]:
    """An HTTPS release whose runtime is pinned and whose plugin is verified against its
    SHA256SUM, as the shipped lock's default ("cpu") pair is."""
    work = tmp_path_factory.mktemp("release")
    server = ReleaseServer(work / "srv", tls=test_ca).start()
    try:
        yield server, publish_release(server, work, verify=["plugin"])
    finally:
        server.stop()


@pytest.fixture(scope="module")
def offline_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with wheels, built from its own server, which is stopped afterwards."""
    work = tmp_path_factory.mktemp("bundle")
    server = ReleaseServer(work / "srv").start()
    try:
        release = publish_release(server, work, known_sha=False)
        dest = work / "bundle"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgebundle",
                "bundle",
                "build",
                str(dest),
                "--lock",
                str(release.lock),
                "--pins",
                str(release.pins),
                "--app",
                "llama-chat",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    return dest


def test_help_and_bad_flags(tmp_path: Path) -> None:
    done = run_sh("--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage: ./install.sh [OPTIONS]")
    assert "--update-profile" in done.stdout
    done = run_sh("--frobnicate")
    assert done.returncode == 2
    assert done.stderr == "install.sh: unknown option --frobnicate; see ./install.sh --help\n"
    done = run_sh("--home")
    assert (done.returncode, done.stderr) == (
        2,
        "install.sh: --home needs a value; see ./install.sh --help\n",
    )
    done = run_sh("--home", str(tmp_path / "h"), "--bundle", str(tmp_path))
    assert done.returncode == 2 and "is not a bundle directory (no bundle.json)" in done.stderr
    assert not (tmp_path / "h").exists()  # nothing made before the inputs were checked


def test_old_python_is_one_line(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\ncase "$*" in *python_version*) echo 3.9.18 ;; *) exit 1 ;; esac\n')
    old.chmod(0o755)
    done = run_sh("--home", str(tmp_path / "h"), "--python", str(old))
    assert done.returncode == 1
    assert done.stderr == (
        f"install.sh: error: {old} is Python 3.9.18; edgebundle needs Python "
        ">= 3.11 (pass --python PATH)\n"
    )
    done = run_sh("--python", str(tmp_path / "nope"))
    assert done.returncode == 1 and "not found; install Python >= 3.11" in done.stderr


def test_install_from_checkout_then_rerun(
    served: tuple[ReleaseServer, Release], test_ca: TestCA, tmp_path: Path
) -> None:
    server, release = served
    trust = {EXTRA_CA_ENV: str(test_ca.ca_cert)}
    home, fake_home = tmp_path / "eb home", tmp_path / "user"
    fake_home.mkdir()
    (fake_home / ".bashrc").write_text("# user's own\n")
    args = [
        "--home",
        str(home),
        "--python",
        sys.executable,
        "--no-embedded",  # the package alone must work without the llama.cpp build
        "--lock",
        str(release.lock),
        "--pins",
        str(release.pins),
        "--app",
        "llama-chat",
    ]
    done = run_sh(*args, home_dir=fake_home, extra_env=trust)
    assert done.returncode == 0, done.stderr
    assert f"==> creating {home / 'venv'}" in done.stderr
    # Which file was pinned and which verified against the publisher's file, said per file.
    assert (
        f"  {release.runtime.name}: sha256 {sha256(release.runtime)} pinned in {release.lock}"
        in done.stdout.splitlines()
    )
    assert (
        f"  {release.plugin.name}: sha256 {sha256(release.plugin)} verified against the "
        f"publisher's {server.url('SHA256SUM')} (read now over https; not pinned)"
        in done.stdout.splitlines()
    )
    version = subprocess.run(
        [str(home / "venv" / "bin" / "edgebundle"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "edgebundle, version 0.1.0"
    assert os.readlink(home / "runtime" / "current") == "wasmedge-0.14.1-cpu"
    assert (home / "apps" / "llama-chat-0.14.1.wasm").is_file()
    assert "edgebundle doctor" in done.stdout
    assert (fake_home / ".bashrc").read_text() == "# user's own\n"  # never edited unasked
    sourced = subprocess.run(
        [
            "bash",
            "-c",
            '. "$1" && command -v edgebundle && wasmedge --version',
            "bash",
            str(home / "env"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert sourced.stdout.splitlines()[0] == str(home / "venv" / "bin" / "edgebundle")
    assert '(plugin "wasi_nn")' in sourced.stdout

    fetched = len(server.gets())
    again = run_sh(*args, "--update-profile", "--with-redis", home_dir=fake_home,
                   extra_env=trust)
    assert again.returncode == 0, again.stderr
    assert f"==> reusing {home / 'venv'}" in again.stderr
    assert "==> redis-server is already installed" in again.stderr  # (the fixture's own)
    assert len(server.gets()) == fetched  # idempotent: nothing downloaded again
    sourcing = [
        line for line in (fake_home / ".bashrc").read_text().splitlines() if line.startswith(". ")
    ]
    assert sourcing == [". " + str(home / "env").replace(" ", "\\ ")]  # bash's printf %q


def test_install_from_bundle_offline(offline_bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads((offline_bundle / "bundle.json").read_text())
    assert any(k.startswith("wheels/edgebundle-") for k in manifest["files"])
    home = tmp_path / "device"
    done = run_sh(
        "--home",
        str(home),
        "--python",
        sys.executable,
        "--bundle",
        str(offline_bundle),
        "--require-wasmedge",
        "--app",
        "llama-chat",
    )
    assert done.returncode == 0, done.stderr
    assert "(offline)" in done.stderr
    assert os.readlink(home / "runtime" / "current") == "wasmedge-0.14.1-cpu"
    assert (home / "apps" / "llama-chat-0.14.1.wasm").is_file()
    version = subprocess.run(
        [str(home / "venv" / "bin" / "edgebundle"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "edgebundle, version 0.1.0"


def test_failed_install_removes_the_new_venv(offline_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    data = json.loads((offline_bundle / "bundle.json").read_text())
    data["files"] = {
        k: v for k, v in data["files"].items() if not k.startswith("wheels/edgebundle-")
    }
    (broken / "bundle.json").write_text(json.dumps(data))
    (broken / "wheels").mkdir()
    for relpath in data["files"]:  # every wheel but edgebundle's: pip install must fail
        if relpath.startswith("wheels/"):
            (broken / relpath).symlink_to(offline_bundle / relpath)
    home = tmp_path / "device"
    done = run_sh("--home", str(home), "--python", sys.executable, "--bundle", str(broken))
    assert done.returncode == 1
    assert f"install.sh: error: {broken}/bundle.json lists no edgebundle wheel" in done.stderr
    assert done.stderr.endswith(f"install.sh: removed the unfinished {home / 'venv'}\n")
    assert not (home / "venv").exists()


def fake_wheel(directory: Path, name: str, version: str) -> Path:
    """A valid pure-Python wheel of ``name`` ``version`` whose `edgebundle` says so."""
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n',
        f"{name}/__main__.py": f'print("edgebundle, version {version}")\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[console_scripts]\n{name} = {name}.__main__:main\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        record = "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"])
        archive.writestr(f"{info}/RECORD", record)
    return wheel


def test_a_wheel_the_bundle_does_not_list_is_never_installed(
    offline_bundle: Path, tmp_path: Path
) -> None:
    """An unlisted, newer edgebundle wheel dropped into DIR/wheels: pip never sees it."""
    copy = tmp_path / "bundle"
    data = json.loads((offline_bundle / "bundle.json").read_text())
    for relpath in [*data["files"], "bundle.json"]:
        (copy / relpath).parent.mkdir(parents=True, exist_ok=True)
        (copy / relpath).symlink_to(offline_bundle / relpath)
    planted = fake_wheel(copy / "wheels", "edgebundle", "9.9.9")
    home = tmp_path / "device"
    done = run_sh("--home", str(home), "--python", sys.executable, "--bundle", str(copy),
                  "--no-runtime")
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([str(home / "venv" / "bin" / "python"), "-m", "pip", "show",
                            "edgebundle"], capture_output=True, text=True, check=True)
    assert "Version: 0.1.0" in shown.stdout.splitlines()
    assert planted.is_file()  # still there, unused
