"""The terminal chat's options: which gateway, which thread, and the chat's device id.

The device id of the chat is ``--device-id``, else the configured ``device_id``
(``EDGEBUNDLE_DEVICE_ID`` or config.toml), else one made on first use
(``chat-<hex>``) and kept in ``<home>/state/chat-device-id``: the chat is a device
of its own, apart from the gateway it talks to.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from edgebundle import keys
from edgebundle.config import Settings, local_gateway_url
from edgebundle.device_ids import kept_device_id
from edgebundle.errors import ConfigError

CHAT_DEVICE_FILE = "chat-device-id"


@dataclass(frozen=True)
class ChatOptions:
    server: str
    thread_id: str | None = None
    device_id: str = ""
    api_key: str | None = None
    max_tokens: int | None = None


def check_server(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad --server {url!r}: use the gateway's URL, such as "
                          "http://127.0.0.1:8080")
    return url.rstrip("/")


def chat_device_id(settings: Settings) -> str:
    """The configured device id, else the chat's own, made once and kept in the state dir
    (a read-only home: an id for this session only)."""
    return kept_device_id(settings, CHAT_DEVICE_FILE, "chat", unkept_ok=True)


def chat_options(settings: Settings, *, server: str | None, thread_id: str | None,
                 max_tokens: int | None) -> ChatOptions:
    """Options for the chat from the settings and the command line."""
    return ChatOptions(
        server=check_server(server or local_gateway_url(settings)),
        thread_id=None if thread_id is None else keys.check_id("thread", thread_id),
        device_id=chat_device_id(settings),
        api_key=settings.api_key,
        max_tokens=max_tokens,
    )
