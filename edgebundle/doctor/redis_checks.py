"""Check that the sync Redis answers PING with the configured credentials.

One attempt, one-second timeouts, no retries: a doctor must answer quickly, and a
Redis that needs retries to answer PING is worth a failing check. The password never
appears in a summary (config.redact_url).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from edgebundle.config import redact_url
from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip

REACHABLE = "redis.reachable"
TIMEOUT_SECONDS = 1.0
_AUTH_WORDS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")


def checks(ctx: Context) -> list[CheckResult]:
    url = ctx.settings.redis_url
    if url is None:
        return [skip(REACHABLE, "no Redis configured (--redis-url or EDGEBUNDLE_REDIS_URL)")]
    if not ctx.online:
        return [skip(REACHABLE, f"offline checks only; {redact_url(url)} not contacted")]
    return [ping(url)]


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def _scrub(message: str, url: str) -> str:
    password = urlsplit(url).password
    return message.replace(password, "***") if password else message


def ping(url: str) -> CheckResult:
    # Imported here: redis-py takes ~0.1 s to import, and offline doctor never needs it.
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    where = _where(url)
    has_password = urlsplit(url).password is not None
    client = redis.Redis.from_url(
        url,
        socket_timeout=TIMEOUT_SECONDS,
        socket_connect_timeout=TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return _auth_failed(url, where, has_password, str(exc))
    except redis.ResponseError as exc:
        if any(word.lower() in str(exc).lower() for word in _AUTH_WORDS):
            return _auth_failed(url, where, has_password, str(exc))
        return fail(
            REACHABLE,
            f"Redis at {where} answered PING with an error: {_scrub(str(exc), url)}",
            "check the Redis user's ACL allows PING",
        )
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        return fail(
            REACHABLE,
            f"cannot reach redis at {where}: {_scrub(str(exc), url) or type(exc).__name__}",
            "start Redis there, or fix --redis-url / EDGEBUNDLE_REDIS_URL (and any firewall)",
        )
    finally:
        client.close()
    return ok(REACHABLE, f"PONG from {redact_url(url)}")


def _auth_failed(url: str, where: str, has_password: bool, message: str) -> CheckResult:
    if not has_password:
        return fail(
            REACHABLE,
            f"Redis at {where} requires a password and none was given",
            "put it in the URL: redis://:PASSWORD@host:port (or user:PASSWORD@ for an ACL user)",
        )
    return fail(
        REACHABLE,
        f"Redis at {where} refused the password ({_scrub(message, url)})",
        "fix the password in --redis-url / EDGEBUNDLE_REDIS_URL (redis://user:PASSWORD@host:port)",
    )
