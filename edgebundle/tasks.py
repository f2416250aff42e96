"""Stopping background tasks for good.

``task.cancel()`` once is not always enough on Python 3.11: ``asyncio.wait_for`` whose
inner awaitable finishes at the moment the cancel arrives returns that result and the
CancelledError is lost (fixed in 3.12), so a loop that was cancelled goes round again
and whoever awaits it waits forever (``edgebundle run`` that never stops on SIGTERM).
The loops here use ``asyncio.timeout`` instead, which keeps a cancel; and
:func:`cancel_and_wait` cancels again whatever is still running, so a lost cancel
anywhere below (a library's wait_for) cannot hang a shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

_RECANCEL = 0.02  # s between cancels of a task that is still running


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and return once every one has ended; their results and errors
    are dropped (the caller stops them, it does not need them)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio would log it as never retrieved
