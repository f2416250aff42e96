"""Whether the embedded runtime (wasmtime + llama-cpp-python) can run here.

Only looked up, never imported: importing llama_cpp loads a large native library,
and the offline checks must stay well under a second.
"""

from __future__ import annotations

import importlib.util

from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn
from edgebundle.runtime.install_hint import wasmedge_install_hint

EMBEDDED = "runtime.embedded"
EMBEDDED_MODULE = "edgebundle.runtime.embedded"
# module -> what to install for it
REQUIREMENTS = {"wasmtime": "wasmtime", "llama_cpp": "llama-cpp-python"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def checks(ctx: Context) -> list[CheckResult]:
    if ctx.runtime == "embedded" and ctx.app_kind not in (None, "edgechat"):
        # run refuses this (launch.choose_runtime); say it where the embedded runtime is judged.
        return [fail(
            EMBEDDED,
            f"{ctx.app_kind} cannot run on the embedded runtime: it needs WasmEdge's socket "
            "extension",
            "pass --runtime wasmedge (or auto), or drop --app to serve the built-in edgechat app",
        )]  # fmt: skip
    packages = [pkg for module, pkg in REQUIREMENTS.items() if not _installed(module)]
    has_module = _installed(EMBEDDED_MODULE)
    if not packages and has_module:
        return [ok(EMBEDDED, f"{' and '.join(REQUIREMENTS.values())} are installed")]
    missing = []
    if not has_module:
        missing.append("this edgebundle has no embedded runtime yet")
    if packages:
        missing.append(
            f"{' and '.join(packages)} {'is' if len(packages) == 1 else 'are'} not installed"
        )
    summary = "; ".join(missing)
    fixes = []
    if packages:
        pip = ctx.layout.venv / "bin" / "pip"
        fixes.append(f"`{pip} install {' '.join(packages)}` (or re-run ./install.sh)")
    if not has_module:
        hint = wasmedge_install_hint(ctx.lock, ctx.host)
        fixes.append(f"use WasmEdge with --runtime wasmedge: {hint}")
    fix = "; ".join(fixes)
    if ctx.runtime == "embedded":
        return [fail(EMBEDDED, f"run would use the embedded runtime, but {summary}", fix)]
    if ctx.requested == "wasmedge":
        return [skip(EMBEDDED, f"not used with --runtime wasmedge ({summary})")]
    return [warn(EMBEDDED, f"no fallback if wasmedge breaks: {summary}", fix)]
