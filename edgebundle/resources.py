"""Files that ship with edgebundle: the pins (``plugins/``, ``wasm/``) and built guests.

In a wheel they sit in ``edgebundle/_bundled``; in a source checkout (editable
install, tests) they are at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_root() -> Path:
    bundled = _PACKAGE / "_bundled"
    return bundled if bundled.is_dir() else _PACKAGE.parent


def runtime_lock_file() -> Path:
    return data_root() / "plugins" / "wasmedge.lock.toml"


def app_pins_file() -> Path:
    return data_root() / "wasm" / "pins.toml"


def wasm_dir() -> Path:
    return data_root() / "wasm"
