"""The HTTP gateway of ``edgebundle run``: an OpenAI-compatible API over the chat engine.

:func:`create_app` builds the Starlette app (routes in :mod:`.app`, wire format in
:mod:`.openai_api`); :func:`run_gateway` serves it with uvicorn while the engine
loads and runs behind it (:mod:`.server`).
"""

from edgebundle.gateway.app import GatewayState, create_app
from edgebundle.gateway.server import Listening, run_gateway

__all__ = ["GatewayState", "Listening", "create_app", "run_gateway"]
