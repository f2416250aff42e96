"""Connecting to the sync Redis: standalone or Redis Cluster, found out by asking.

``connect(url)`` opens a ``redis.asyncio`` client; when the server says
``cluster_enabled:1`` it returns a cluster client instead, so users give one URL
either way. Every key of a thread shares its hash tag, so every multi-key function
call runs on one node.

Surviving a restart of Redis: pooled connections to the old server are stale, and
the first command on each would fail. Every command is therefore retried on a
connection error or timeout, reconnecting, with exponential backoff (about 2.5 s in
all, see :data:`RETRIES`), so a restart or a blip is invisible to callers and a
longer outage surfaces as an error after a few seconds (the gateway answers 503
``redis_unavailable`` then, and recovers by itself when Redis is back). A retried
function call that the old server ran but could not answer runs twice; every function
of the sync core makes that harmless: pushes by mutation id, a run's start by its input
id, text batches by their seq, a run's end by its fence.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as _ConnectionError
from redis.exceptions import RedisError as _RedisPyError
from redis.exceptions import TimeoutError as _TimeoutError

from edgebundle.config import redact_url, validate_redis_url
from edgebundle.errors import RedisAccessError

Client = aioredis.Redis | RedisCluster

RETRIES = 6  # reconnect attempts per command: 0.05, 0.1, 0.2, 0.4, 0.8, 1 s at most (jittered)
CONNECT_TIMEOUT = 5.0  # s; an unreachable host fails this fast instead of the OS's minutes
POOL_SIZE = 100  # connections of a client at once (redis-py's default)
POOL_WAIT = 5.0  # s a command waits for a free connection of a full waiting pool


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES,
                 supported_errors=(_ConnectionError, _TimeoutError))


async def connect(url: str, *, pool_size: int = POOL_SIZE, wait_for_pool: bool = False,
                  **options: Any) -> Client:
    """A connected client for ``url``; RedisAccessError with a clear line if it cannot be.

    Its pool holds ``pool_size`` connections at most (per node of a cluster). A command
    that finds them all busy fails ("Too many connections", retried like a lost
    connection) or, with ``wait_for_pool`` (standalone Redis), waits up to
    :data:`POOL_WAIT` for one. The gateway gives blocking reads (``XREAD BLOCK``,
    ``BLPOP``) a client of their own (:mod:`edgebundle.sync.backend`), so however many
    of them wait, ordinary commands find a connection.
    """
    validate_redis_url(url)
    options.setdefault("decode_responses", True)
    options.setdefault("retry", _retry())
    options.setdefault("retry_on_error", [_ConnectionError, _TimeoutError])
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    options["max_connections"] = pool_size
    if wait_for_pool:
        pool: ConnectionPool = BlockingConnectionPool.from_url(url, timeout=POOL_WAIT, **options)
    else:
        pool = ConnectionPool.from_url(url, **options)
    probe = aioredis.Redis.from_pool(pool)  # the client closes its pool
    try:
        info = await probe.info("cluster")
    except AuthenticationError:
        await probe.aclose()
        raise RedisAccessError(f"Redis at {redact_url(url)} refused the password") from None
    except (_RedisPyError, OSError) as exc:
        await probe.aclose()
        raise RedisAccessError(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
    if int(info.get("cluster_enabled", 0)) != 1:
        return probe
    await probe.aclose()
    cluster = RedisCluster.from_url(url, **options)
    await cluster.initialize()
    return cluster
