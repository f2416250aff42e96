"""What a long step shows while it works: download progress and log lines.

On a terminal a rich progress bar; elsewhere (CI logs) a plain line every ~10 %.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TextIO

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None when the server does not say)."""

ProgressFactory = Callable[[str], AbstractContextManager[Progress]]
"""Makes the progress callback for one labelled download; leaving the context ends it."""

Log = Callable[[str], None]
"""Where installers and bundle builders say what they do, one line at a time."""


def progress_for(
    factory: ProgressFactory | None, label: str
) -> AbstractContextManager[Progress | None]:
    """The factory's progress context for ``label``, or one yielding None (no progress)."""
    if factory is None:
        return nullcontext(None)
    return factory(label)


@contextmanager
def terminal_progress(label: str, stream: TextIO | None = None) -> Iterator[Progress]:
    """A rich progress bar on a terminal; elsewhere (CI logs) a plain line every ~10 %."""
    out = stream if stream is not None else sys.stderr
    if out.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with RichProgress(*columns, console=Console(file=out)) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    yield _PlainProgress(label, out)


class _PlainProgress:
    """Log-friendly progress: one line per 10 % (or per 10 MB when the size is unknown)."""

    def __init__(self, label: str, out: TextIO) -> None:
        self.label, self.out, self.last_step = label, out, -1

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            step = min(10, done * 10 // total)
            text = f"{step * 10}% of {_size(total)}"
        else:
            step = done // (10 * 1024 * 1024)
            text = _size(done)
        if step > self.last_step and (step > 0 or done == total):
            self.last_step = step
            print(f"{self.label}: {text}", file=self.out, flush=True)


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"
