"""The fleet's one duration grammar: ``30s``, ``5m``, ``1h30m``, ``2d``, ``250ms`` or seconds.

A leaf module, used by the manifest schema only: it turns every duration into seconds,
both when a manifest is read and when the stored rollout document (which keeps the
manifest's ``spec.rollout``) is read back, so the controller never parses one itself.
"""

from __future__ import annotations

import math
import re
from typing import Any

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``5m``, ``1h30m``, ``2d``, ``250ms`` or a number of seconds;
    ValueError (the schema's validators turn it into a located problem) if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 1h or seconds")
    if isinstance(value, str):
        text = value.strip()
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 1h or seconds")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration: it must be 0 or more")
    return seconds
