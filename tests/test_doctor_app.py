"""app.wasm check: real wasm files compared with pins in a real pins.toml."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.support.doctor_env import diagnose, write_app_pins, write_wasm

UNKNOWN = "unknown"


def test_no_app_is_skipped(home: Path) -> None:
    assert diagnose(home).check("app.wasm").status == "skip"


def test_app_with_a_checksum_different_from_the_pin_fails(home: Path, tmp_path: Path) -> None:
    app, digest = write_wasm(home / "apps" / "llama-api-server-0.22.1.wasm", b"tampered")
    pinned = hashlib.sha256(b"the real one").hexdigest()
    pins = write_app_pins(
        tmp_path / "p", (("llama-api-server", "0.22.1", "llama-api-server.wasm", pinned),)
    )
    check = diagnose(home, app_pins=pins).check("app.wasm")  # the single installed app
    assert check.status == "fail"
    assert digest in check.summary and pinned in check.summary
    assert check.fix and "install.sh" in check.fix


def test_app_with_the_pinned_checksum_passes(home: Path, tmp_path: Path) -> None:
    app, digest = write_wasm(tmp_path / "dl" / "llama-api-server.wasm")
    pins = write_app_pins(
        tmp_path / "p", (("llama-api-server", "0.22.1", "llama-api-server.wasm", digest),)
    )
    check = diagnose(home, app=app, app_pins=pins).check("app.wasm")
    assert check.status == "ok"
    assert "llama-api-server 0.22.1" in check.summary


def test_app_whose_pin_has_no_known_checksum_warns(home: Path, tmp_path: Path) -> None:
    app, digest = write_wasm(tmp_path / "llama-chat.wasm")
    pins = write_app_pins(tmp_path / "p", (("llama-chat", "0.22.1", "llama-chat.wasm", UNKNOWN),))
    check = diagnose(home, app=app, app_pins=pins).check("app.wasm")
    assert check.status == "warn"
    assert digest in check.summary and "cannot be verified" in check.summary


def test_unpinned_app_warns_with_its_checksum(home: Path, tmp_path: Path) -> None:
    app, digest = write_wasm(tmp_path / "mine.wasm")
    check = diagnose(home, app=app).check("app.wasm")
    assert check.status == "warn"
    assert check.summary == f"mine.wasm is not a pinned app (sha256 {digest})"


def test_app_that_is_not_wasm_fails(home: Path, tmp_path: Path) -> None:
    app = tmp_path / "llama-api-server.wasm"
    app.write_bytes(b"Not Found")
    check = diagnose(home, app=app).check("app.wasm")
    assert check.status == "fail"
    assert "not a WebAssembly module" in check.summary


def test_missing_app_fails(home: Path, tmp_path: Path) -> None:
    check = diagnose(home, app=tmp_path / "gone.wasm").check("app.wasm")
    assert check.status == "fail"
    assert "gone.wasm does not exist" in check.summary


def test_several_installed_apps_need_a_choice(home: Path) -> None:
    write_wasm(home / "apps" / "a.wasm")
    write_wasm(home / "apps" / "b.wasm")
    check = diagnose(home).check("app.wasm")
    assert check.status == "skip"
    assert "choose one with --app" in check.summary
