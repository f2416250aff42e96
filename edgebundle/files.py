"""Files and links replaced atomically: a reader sees the old one or the new one, never
a half-written file or a missing link (a crash leaves at most a hidden temporary).

Each is made beside its target (``.<name>.tmp-<hex>``, same directory, so same file
system: ``os.replace`` is a rename) and renamed over it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_beside(path: Path) -> Path:
    """A fresh hidden name in ``path``'s directory (random: two writers never share it)."""
    return path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write; when the block ends without an exception it replaces
    ``path``. Whatever is left at the temporary path is removed in any case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """``path``'s text (UTF-8) replaced atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def switch_link(link: Path, target: str | Path) -> None:
    """Point the symlink ``link`` at ``target`` (kept as given: a relative target stays
    relative) atomically: a new link renamed over the old one. Raises OSError."""
    tmp = temporary_beside(link)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
