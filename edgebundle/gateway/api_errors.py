"""The sync API's errors over HTTP: ``{"error": code, "message": …}`` and its status.

The cores raise the errors of :mod:`edgebundle.errors`; :func:`api_error` maps them to
HTTP statuses. A 503 ``redis_unavailable`` does not say where the sync Redis is (the
log does).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from edgebundle.errors import (
    BusyError,
    EdgebundleError,
    EpochMismatchError,
    LeaseLostError,
    MessageTooLargeError,
    OfflineError,
    QueueFullError,
    RedisAccessError,
    RunNotFoundError,
    ThreadBusyError,
    ThreadFullError,
    ThreadNotFoundError,
    UsageError,
)
from edgebundle.limits import RETRY_AFTER

log = logging.getLogger(__name__)

REDIS_UNAVAILABLE = ("the sync Redis is unavailable: try again in a few seconds (the device's "
                     "log says why)")


class ApiError(Exception):
    """A request the sync API refuses: HTTP ``status``, ``code`` and one-line message."""

    def __init__(self, status: int, code: str, message: str, *,
                 retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}
        if retry_after is not None:  # when to try again (a busy thread, a cap reached)
            self.headers["Retry-After"] = str(retry_after)

    def response(self) -> JSONResponse:
        body = {"error": self.code, "message": self.message, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def redis_unavailable(exc: Exception) -> ApiError:
    """The 503 for a sync Redis that did not answer. Clients learn that, not where it
    is: the driver's text names the internal host and port, so it goes to the log."""
    log.warning("the sync Redis is unavailable: %s", exc)
    return ApiError(503, "redis_unavailable", REDIS_UNAVAILABLE)


def api_error(exc: EdgebundleError) -> ApiError:
    """The HTTP answer for an error of the sync core."""
    if isinstance(exc, EpochMismatchError):
        return ApiError(409, "epoch_mismatch", str(exc), epoch=exc.epoch)
    if isinstance(exc, ThreadBusyError):
        return ApiError(409, "thread_busy", str(exc), retry_after=exc.retry_after,
                        active_run=exc.active_run.to_json() if exc.active_run else None)
    if isinstance(exc, ThreadNotFoundError):
        return ApiError(404, "thread_not_found", str(exc))
    if isinstance(exc, RunNotFoundError):
        return ApiError(404, "run_not_found", str(exc))
    if isinstance(exc, MessageTooLargeError):
        return ApiError(413, "message_too_large", str(exc))
    if isinstance(exc, ThreadFullError):
        return ApiError(409, "thread_full", str(exc))
    if isinstance(exc, BusyError):
        code = "queue_full" if isinstance(exc, QueueFullError) else "too_many_runs"
        return ApiError(429, code, str(exc), retry_after=exc.retry_after)
    if isinstance(exc, LeaseLostError):
        return ApiError(409, "run_ended", str(exc))
    if isinstance(exc, UsageError):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, RedisAccessError):
        return redis_unavailable(exc)
    if isinstance(exc, OfflineError):
        return ApiError(503, "offline", str(exc))
    return ApiError(500, "sync_error", str(exc))


def busy(code: str, message: str) -> ApiError:
    """A 429 that says when to try again."""
    return ApiError(429, code, message, retry_after=RETRY_AFTER)
