"""The committed wasm/edgechat.wasm is exactly what its source builds to.

Rebuilds the guest with the Makefile (Debian clang + wasi-libc, wasm32-wasi) and
compares the bytes: clang's output is deterministic for the same source and flags.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import wasmtime

from tests.support.guest import EDGECHAT, REPO

NN_IMPORTS = {"load_by_name", "load_by_name_with_config", "init_execution_context", "set_input",
              "compute_single", "get_output_single", "fini_single", "get_output"}


def test_rebuilt_guest_is_byte_identical_to_the_committed_one(tmp_path: Path) -> None:
    out = tmp_path / "edgechat.wasm"
    subprocess.run(["make", "-s", "-C", str(REPO / "wasm" / "edgechat"), f"OUT={out}"],
                   check=True, timeout=120)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == \
        hashlib.sha256(EDGECHAT.read_bytes()).hexdigest(), \
        "wasm/edgechat.wasm is stale: run `make -C wasm/edgechat` and commit the result"


def test_guest_imports_only_what_the_wasmedge_plugin_offers() -> None:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(EDGECHAT))
    by_module: dict[str, set[str]] = {}
    for item in module.imports:
        by_module.setdefault(item.module, set()).add(item.name or "")
    assert set(by_module) == {"wasi_ephemeral_nn", "wasi_snapshot_preview1"}
    assert by_module["wasi_ephemeral_nn"] == NN_IMPORTS
    for item in module.imports:
        if item.module == "wasi_ephemeral_nn":
            ty = item.type
            assert isinstance(ty, wasmtime.FuncType)
            assert all(str(p) == "i32" for p in [*ty.params, *ty.results])
            assert len(ty.results) == 1


def test_committed_guest_matches_its_pin() -> None:
    """wasm/pins.toml pins the shipped guest; doctor's app.wasm check relies on it."""
    from edgebundle import pins, resources

    pin = pins.load_app_pins(resources.app_pins_file()).app("edgechat")
    assert pin.kind == "edgechat" and pin.url == EDGECHAT.resolve().as_uri()
    assert pin.sha256 == hashlib.sha256(EDGECHAT.read_bytes()).hexdigest()
