"""Check of an offline-first device's link to its central Redis, as its gateway tells it.

A device started with ``--redis-url`` keeps a local store and, once the central Redis
has not answered for a while, serves from it (:mod:`edgebundle.sync.replication`); the
``sync`` object of its ``/healthz`` says whether it is offline and how many changes
wait to be sent. Doctor asks the running gateway of the settings (host, port) once,
with a short timeout and no retries, as it pings Redis: a gateway that is not running,
or keeps no local store, is nothing to check (skip). Only the standard library is
used, so an offline doctor stays fast.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any

from edgebundle.config import local_gateway_url, redact_url
from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, ok, skip, warn

REPLICATION = "sync.replication"
TIMEOUT_SECONDS = 1.0
# Our own gateway on this machine: never through an HTTP proxy of the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def checks(ctx: Context) -> list[CheckResult]:
    gateway = local_gateway_url(ctx.settings)
    if not ctx.online:
        return [skip(REPLICATION, f"offline checks only; the gateway at {gateway} not asked")]
    return [replication(gateway, ctx.settings.redis_url)]


def replication(gateway: str, central_url: str | None) -> CheckResult:
    """What the gateway at ``gateway`` says of its link (``central_url``: for the fix)."""
    health = _healthz(gateway)
    if isinstance(health, str):
        return skip(REPLICATION, health)
    sync = health.get("sync")
    if not isinstance(sync, dict):
        return skip(REPLICATION, f"the gateway at {gateway} keeps no local store (it has no "
                                 "central Redis, or no redis-server to keep one)")
    pending = sync.get("pending")
    pending = pending if isinstance(pending, int) else 0
    if sync.get("link") == "offline":
        return warn(
            REPLICATION,
            f"offline since {_when(sync.get('offline_since'))}, {_changes(pending)} pending: "
            f"the gateway at {gateway} serves from its local store",
            f"check the link to the central Redis at {_central(central_url)}; the changes "
            "are sent when it is back",
        )
    if pending:
        return ok(REPLICATION, f"online, sending {_changes(pending)} made offline")
    return ok(REPLICATION, "online, nothing pending")


def _healthz(gateway: str) -> dict[str, Any] | str:
    """The gateway's /healthz body, or why there is none to read (a skip's summary)."""
    try:
        with _DIRECT.open(f"{gateway}/healthz", timeout=TIMEOUT_SECONDS) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return f"the gateway at {gateway} is still loading its model"
        return f"{gateway}/healthz answered HTTP {exc.code}: not an edgebundle gateway?"
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return f"{gateway} did not answer /healthz within {TIMEOUT_SECONDS:g} s"
        return f"no gateway answers on {gateway} ({reason or type(reason).__name__})"
    except ValueError:
        return f"{gateway}/healthz did not answer JSON: not an edgebundle gateway?"
    if not isinstance(body, dict):
        return f"{gateway}/healthz did not answer an object: not an edgebundle gateway?"
    return body


def _when(unix_time: object) -> str:
    if not isinstance(unix_time, int | float):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix_time))


def _changes(count: int) -> str:
    return f"{count} change{'' if count == 1 else 's'}"


def _central(url: str | None) -> str:
    if url is None:
        return "the --redis-url of `edgebundle run`"
    return redact_url(url)
