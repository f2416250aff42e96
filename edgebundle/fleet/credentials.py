"""A device's credentials on a revision's sync Redis: lent only to its own Redis, checked.

Owns :func:`with_credentials` (the agent's own ACL user and password added to a
revision's ``sync.redis_url`` only when it names the same server: manifests carry no
passwords) and :func:`login_refused` (whether that Redis takes the login, checked
before a revision is switched to).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import RedisError as _RedisPyError

from edgebundle.config import redact_url
from edgebundle.errors import ConfigError

LOGIN_TIMEOUT = 2.0  # s for the login check of a revision's sync Redis


def with_credentials(url: str | None, own: str) -> str | None:
    """``url`` logged in as this device: manifests carry no passwords (each device has its
    own ACL user, see fleet provision), so the agent's own credentials are used.

    Only on the central Redis the device was provisioned for (``own``: same scheme, host
    and port; the db may differ): a manifest naming another server, or ``redis://`` for
    a ``rediss://`` one, would carry the device's password there. ConfigError instead.
    The credentials are copied as ``own`` spells them (already percent-encoded).
    """
    if not url:
        return None
    parts, mine = urlsplit(url), urlsplit(own)
    if parts.username is not None or parts.password is not None:
        return url  # logs in as someone else (the manifest schema refuses that): not ours
    userinfo, at, _ = mine.netloc.rpartition("@")
    if not at:
        return url  # the device itself logs in without credentials: nothing to leak
    if _endpoint(url) != _endpoint(own):
        downgrade = (mine.scheme.lower() == "rediss" and parts.scheme.lower() != "rediss")
        why = " and without TLS (rediss -> redis)" if downgrade else ""
        raise ConfigError(
            f"the revision's sync.redis_url {redact_url(url)} is not the Redis this device was "
            f"provisioned for ({redact_url(own)}): the device's password is sent nowhere "
            f"else{why}; point spec.sync.redis_url at that Redis, or leave it out")
    return parts._replace(netloc=f"{userinfo}@{parts.netloc}").geturl()


def _endpoint(url: str) -> tuple[str, str, int | str | None]:
    """(scheme, host, port) a Redis URL connects to (a unix socket: its path)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return scheme, "", parts.path
    try:
        port = parts.port or 6379
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


async def login_refused(url: str | None) -> str | None:
    """Why ``url``'s Redis refuses to log us in, or None (logged in, or not reachable now).

    A refused login is the revision's (or the device's) fault and fails the revision; an
    unreachable Redis is the network's state (see :func:`revision_failures`).
    """
    if not url:
        return None
    client = aioredis.from_url(url, socket_connect_timeout=LOGIN_TIMEOUT,
                               socket_timeout=LOGIN_TIMEOUT, retry=Retry(NoBackoff(), 0))
    try:
        await client.ping()
    except (AuthenticationError, ResponseError) as exc:
        if isinstance(exc, ResponseError) and not isinstance(exc, AuthenticationError) and not any(
                word in str(exc) for word in ("NOAUTH", "WRONGPASS")):
            return None  # logged in; PING itself not allowed
        user = unquote(urlsplit(url).username or "default")
        password = urlsplit(url).password
        detail = str(exc).replace(unquote(password), "***") if password else str(exc)
        return (f"the sync Redis {redact_url(url)} refused this device's login as {user} "
                f"({detail}): provision the device again (edgebundle fleet provision) and "
                "give the agent its new --redis-url")
    except (_RedisPyError, OSError):
        return None
    finally:
        await client.aclose()
    return None
