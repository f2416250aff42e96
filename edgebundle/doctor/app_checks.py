"""Check of the wasm app: a WebAssembly module whose sha256 is the pinned one.

An app is matched to its pin by the name the installer gives it
(``<home>/apps/<name>-<version>.wasm``) or by the file name of the pin's URL
(``llama-api-server.wasm``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.pins import AppPin

APP = "app.wasm"
WASM_MAGIC = b"\0asm"
REINSTALL_FIX = "re-run ./install.sh to fetch the pinned app, or point --app at the right file"


def configured_app(ctx: Context) -> tuple[Path | None, str]:
    """The app `run` would start, or None and why there is none."""
    if ctx.settings.app is not None:
        return ctx.settings.app, ""
    apps_dir = ctx.layout.apps
    installed = sorted(apps_dir.glob("*.wasm")) if apps_dir.is_dir() else []
    if len(installed) == 1:
        return installed[0], ""
    if installed:
        names = ", ".join(p.name for p in installed)
        return (
            None,
            f"{len(installed)} apps installed under {apps_dir} ({names}); choose one with --app",
        )
    return None, "no app configured (--app PATH or EDGEBUNDLE_APP)"


def matching_pins(path: Path, pins: tuple[AppPin, ...]) -> list[AppPin]:
    by_installed_name = [p for p in pins if f"{p.name}-{p.version}.wasm" == path.name]
    return by_installed_name or [p for p in pins if p.filename == path.name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checks(ctx: Context) -> list[CheckResult]:
    path, why = configured_app(ctx)
    if path is None:
        return [skip(APP, why)]
    return [_check(ctx, path)]


def _check(ctx: Context, path: Path) -> CheckResult:
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        return fail(APP, f"app {path} {what}", REINSTALL_FIX)
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
        digest = sha256_file(path)
    except OSError as exc:
        return fail(
            APP, f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions"
        )
    if head != WASM_MAGIC:
        return fail(
            APP,
            f"{path} is not a WebAssembly module (starts with {head.hex(' ') or 'nothing'}, "
            "not 00 61 73 6d)",
            REINSTALL_FIX,
        )
    candidates = matching_pins(path, ctx.app_pins.apps)
    if not candidates:
        return warn(
            APP,
            f"{path.name} is not a pinned app (sha256 {digest})",
            f"use an app pinned in {ctx.app_pins.path}, or pin this one",
        )
    for pin in candidates:
        if pin.sha256 == digest:
            return ok(APP, f"{path.name}: {pin.name} {pin.version}, sha256 matches the pin")
    known = [p for p in candidates if p.verified]
    if not known:
        pin = candidates[0]
        return warn(
            APP,
            f"{path.name}: {pin.name} {pin.version} has no published sha256 pinned, so it "
            f"cannot be verified (sha256 {digest})",
            "`edgebundle bundle build` on a connected machine records the checksums",
        )
    pin = known[0]
    return fail(
        APP,
        f"{path.name}: sha256 {digest} differs from the pin {pin.sha256} "
        f"({pin.name} {pin.version})",
        REINSTALL_FIX,
    )
