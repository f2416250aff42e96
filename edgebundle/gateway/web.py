"""The web chat page of the gateway: ``GET /`` and its two static assets.

Plain files in ``gateway/web/`` (HTML, one script, one stylesheet; no build step),
shipped inside the package. They hold no data: everything the page shows comes from
the API, which the script calls with the user's key, so :data:`WEB_PATHS` are open
without the API key (a browser cannot send a header when it loads a page).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

WEB_DIR = Path(__file__).with_name("web")

# path -> (file in WEB_DIR, media type)
_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/web/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
WEB_PATHS = frozenset(_FILES)
WEB_MEDIA_TYPES = {path: media_type for path, (_, media_type) in _FILES.items()}

_HEADERS = {
    # Revalidate each load, so a device that upgraded serves its new page at once.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # The page talks to this gateway only and runs only its own script.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
}


def _handler(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    body = (WEB_DIR / name).read_bytes()  # read once: the files are small and fixed

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return serve


def web_routes() -> list[Route]:
    """The routes of the page and its assets (GET, no key needed: see the docstring)."""
    return [Route(path, _handler(name, media_type), methods=["GET"])
            for path, (name, media_type) in _FILES.items()]
