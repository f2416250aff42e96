"""Fix hints say what works on this device: "run ./install.sh" only where it would.

install.sh installs WasmEdge only where the lock pins both archives for the host with a
published sha256 (edgebundle/installer.py ``_install_runtime``); elsewhere doctor says
how to install a verified WasmEdge by hand, how to name one with --wasmedge, or that
the embedded runtime is used meanwhile. Locks here are real files read by the real
loader.
"""

from __future__ import annotations

from pathlib import Path

from edgebundle import resources
from edgebundle.pins import RuntimeLock, load_runtime_lock
from edgebundle.runtime.install_hint import install_sh_works, wasmedge_install_hint
from tests.support.doctor_env import diagnose, environ, host

SHA = "a82f9fb01a6a6f1dfbd1cb069dc96d116f22c15cdb01207a5d0e65096055d092"
RELEASE = "https://github.com/WasmEdge/WasmEdge/releases/download/0.14.1"
REGISTRY = "https://github.com/second-state/WASI-NN-GGML-PLUGIN-REGISTRY/releases/download/b5593"


def _lock(directory: Path, runtime_sha: str, plugin_sha: str) -> RuntimeLock:
    path = directory / "wasmedge.lock.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""schema = 1
[wasmedge]
version = "0.14.1"
[plugin]
name = "wasi_nn"
library = "libwasmedgePluginWasiNN.so"
version = "0.14.1"
build = "b5593"

[[asset]]
component = "wasmedge"
os = "linux"
arch = "x86_64"
url = "{RELEASE}/WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz"
sha256 = "{runtime_sha}"

[[asset]]
component = "plugin"
os = "linux"
arch = "x86_64"
variant = "cpu"
url = "{REGISTRY}/WasmEdge-plugin-wasi_nn-ggml-0.14.1-ubuntu20.04_x86_64.tar.gz"
sha256 = "{plugin_sha}"
""", encoding="utf-8")  # fmt: skip
    return load_runtime_lock(path)


def test_verified_pins_make_install_sh_the_fix(tmp_path: Path) -> None:
    lock = _lock(tmp_path, SHA, SHA)
    assert install_sh_works(lock, host())
    assert wasmedge_install_hint(lock, host()).startswith("run ./install.sh: it installs the "
                                                          "pinned WasmEdge 0.14.1")  # fmt: skip


def test_unverified_pins_say_how_to_install_a_verified_wasmedge_by_hand(tmp_path: Path) -> None:
    lock = _lock(tmp_path, "unknown", "unknown")
    hint = wasmedge_install_hint(lock, host())
    assert not install_sh_works(lock, host())
    assert "run ./install.sh" not in hint
    assert hint.startswith(
        "./install.sh will not download WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz and "
        "WasmEdge-plugin-wasi_nn-ggml-0.14.1-ubuntu20.04_x86_64.tar.gz: "
        f"{lock.path} has no published sha256 for them. By hand: download {RELEASE}/"
        f"WasmEdge-0.14.1-ubuntu20.04_x86_64.tar.gz and check its sha256 against "
        f"{RELEASE}/SHA256SUM"
    )
    assert "then pass --wasmedge DIR/bin/wasmedge" in hint
    assert "`./install.sh --bundle BUNDLE`" in hint


def test_a_pinned_sha_is_named_for_the_check_by_hand(tmp_path: Path) -> None:
    lock = _lock(tmp_path, SHA, "unknown")
    hint = wasmedge_install_hint(lock, host())
    assert hint.startswith("./install.sh will not download WasmEdge-plugin-wasi_nn-ggml")
    assert f"check its sha256 is {SHA}, as wasmedge.lock.toml pins" in hint
    assert "no checksum is published for it" in hint  # the plugin registry publishes none


def test_an_unpinned_platform_says_install_sh_cannot_help(tmp_path: Path) -> None:
    hint = wasmedge_install_hint(_lock(tmp_path, SHA, SHA), host("riscv64", ""))
    assert hint.startswith("./install.sh cannot install WasmEdge here: ")
    assert "pins none for linux/riscv64" in hint and "--wasmedge DIR/bin/wasmedge" in hint


def test_doctor_fix_for_a_missing_wasmedge_is_the_hint_and_the_fallback(home: Path) -> None:
    """Unverified pins: no "run ./install.sh"; the way by hand, and that --runtime auto runs
    the embedded runtime meanwhile (doctor used to say "run ./install.sh" regardless)."""
    lock = _lock(home.parent / "lock", "unknown", "unknown")
    check = diagnose(home, runtime="wasmedge", lock=lock, env=environ()).check("wasmedge.binary")
    assert check.status == "fail" and check.fix is not None
    assert "run ./install.sh" not in check.fix
    assert check.fix.startswith("./install.sh will not download ")
    assert check.fix.endswith("; or drop --runtime wasmedge: --runtime auto runs on the "
                              "embedded runtime")  # fmt: skip
    verified = _lock(home.parent / "lock-ok", SHA, SHA)
    fix = diagnose(home, runtime="wasmedge", lock=verified, env=environ()).check(
        "wasmedge.binary").fix  # fmt: skip
    assert fix is not None and fix.startswith("run ./install.sh: ")


def test_the_shipped_lock_makes_install_sh_the_fix_on_a_linux_cpu(tmp_path: Path) -> None:
    """The runtime pinned by its published sha256 and the plugin checked against its
    release's SHA256SUM at install: plain ./install.sh installs a verified WasmEdge."""
    lock = load_runtime_lock(resources.runtime_lock_file())
    for arch in ("x86_64", "aarch64"):
        assert install_sh_works(lock, host(arch)), arch
        assert wasmedge_install_hint(lock, host(arch)).startswith("run ./install.sh: ")
