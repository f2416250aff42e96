"""Byte counts as people read them in a doctor summary."""

from __future__ import annotations

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``; exact byte counts below 1 KiB."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
