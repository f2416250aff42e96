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


def write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """``path``'s text (UTF-8) replaced atomically. With ``mode`` (e.g. 0o600 for a
    secret) the new file has that mode from its first byte, whatever the umask, so it
    is never readable by others, not even for a moment."""
    with replacing(path) as tmp:
        if mode is None:
            tmp.write_text(text, encoding="utf-8")
            return
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)  # whatever the umask took away
            handle.write(text)


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
