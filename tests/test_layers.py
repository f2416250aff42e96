"""The layers import one way: each module imports only what sits below it.

Read from the source with ``ast`` (imports inside functions included, so a lazy import
cannot hide a cycle). The order is the one edgebundle/__init__.py draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgebundle"

# layer -> the layers it must never import (everything above it)
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"*"},
    "runtime": {"engine", "completion", "context_window", "sync", "doctor", "gateway", "serving",
                "fleet", "cli", "terminal_chat"},
    "engine": {"completion", "sync", "doctor", "gateway", "serving", "fleet", "cli"},
    "sync": {"runtime", "engine", "completion", "doctor", "gateway", "serving", "fleet", "cli"},
    "completion": {"sync", "doctor", "gateway", "serving", "fleet", "cli"},
    "doctor": {"gateway", "serving", "fleet", "cli"},
    "gateway": {"serving", "fleet", "cli", "doctor"},
    "turns": {"gateway", "serving", "fleet", "cli", "doctor"},
    "limits": {"gateway", "serving", "fleet", "cli", "doctor", "turns", "sync", "completion"},
    "sse": {"gateway", "serving", "fleet", "cli", "doctor", "turns", "sync", "completion"},
    "files": {"gateway", "serving", "fleet", "cli", "doctor", "turns", "sync", "completion",
              "runtime"},
    "keys": {"gateway", "serving", "fleet", "cli", "doctor", "turns", "sync", "completion",
             "runtime"},
    "gateway_client": {"gateway", "serving", "fleet", "cli", "doctor", "turns"},
    "serving": {"fleet", "cli"},
    "fleet": {"cli"},
}

# Installing (pins, downloads, the installer's pieces) sits below everything that runs
# a model or a thread; the terminal chat is a client of a gateway, never a gateway.
_ABOVE_INSTALLING = {"engine", "completion", "context_window", "sync", "doctor", "gateway",
                     "turns", "serving", "fleet", "cli", "terminal_chat", "chat_session",
                     "chat_transcript", "chat_options"}
for _module in ("progress", "download", "sha256sum", "archives", "install_plan",
                "verification", "installed_runtimes", "env_file", "installer"):
    FORBIDDEN[_module] = _ABOVE_INSTALLING
for _module in ("chat_options", "chat_transcript", "chat_session", "terminal_chat"):
    FORBIDDEN[_module] = {"runtime", "engine", "completion", "gateway", "turns", "doctor",
                          "serving", "fleet", "cli", "installer"}
FORBIDDEN["runtime"] |= {"chat_options", "chat_transcript", "chat_session"}


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> set[str]:
    """The top-level edgebundle modules/packages ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "edgebundle" else [
                f"edgebundle.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "edgebundle" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) in FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_nothing_above_its_layer(path: Path) -> None:
    layer = layer_of(path)
    forbidden = FORBIDDEN[layer]
    above = imported(path) - {layer}
    wrong = above if "*" in forbidden else above & forbidden
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_the_package_face_names_the_core_api() -> None:
    import edgebundle

    for name in edgebundle.__all__:
        assert getattr(edgebundle, name) is not None
