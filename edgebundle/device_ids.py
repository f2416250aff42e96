"""A device's id: the configured one, else one made once and kept in the state directory.

Every part that acts as a device of its own (the gateway's sync, the terminal chat,
the fleet agent) names itself this way, each with its own file and prefix so that
two parts on one machine are two devices.
"""

from __future__ import annotations

import contextlib
import secrets

from edgebundle import keys
from edgebundle.config import Settings


def new_device_id(prefix: str) -> str:
    """``<prefix>-<12 hex>``: 48 random bits, unique across any real fleet."""
    return f"{prefix}-{secrets.token_hex(6)}"


def kept_device_id(settings: Settings, file_name: str, prefix: str, *,
                   unkept_ok: bool = False) -> str:
    """``settings.device_id`` if set, else the id kept in ``<state>/<file_name>``, else
    a new one written there. ``unkept_ok``: a state directory that cannot be written
    (a read-only home) gives an id for this session only instead of an OSError."""
    if settings.device_id:
        return keys.check_id("device", settings.device_id)
    path = settings.layout.state / file_name
    with contextlib.suppress(OSError):  # unreadable is as good as absent: make one
        kept = path.read_text().strip()
        if kept:
            return keys.check_id("device", kept)
    made = new_device_id(prefix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(made + "\n")
    except OSError:
        if not unkept_ok:
            raise
    return made
