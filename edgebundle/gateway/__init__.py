"""The HTTP gateway of ``edgebundle run``: an OpenAI-compatible API over the chat engine.

:func:`create_app` builds the Starlette app (routes in :mod:`.app`, wire format in
:mod:`.openai_api`); :func:`run_gateway` serves it with uvicorn while the engine
loads and runs behind it (:mod:`.server`). The names below are imported on first
use (PEP 562): :mod:`.listen` binds the port without loading Starlette, uvicorn or
Redis, so ``run`` can start the guest before it imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "GatewayState": "edgebundle.gateway.app",
    "create_app": "edgebundle.gateway.app",
    "Listening": "edgebundle.gateway.server",
    "run_gateway": "edgebundle.gateway.server",
}

__all__ = ["GatewayState", "Listening", "create_app", "run_gateway"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgebundle.gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
