"""Connecting to the sync Redis: standalone or Redis Cluster, found out by asking.

``connect(url)`` opens a ``redis.asyncio`` client; when the server says
``cluster_enabled:1`` it returns a cluster client instead, so users give one URL
either way. Every key of a thread shares its hash tag, so every multi-key script
runs on one node.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError
from redis.exceptions import RedisError as _RedisPyError

from edgebundle.config import redact_url, validate_redis_url
from edgebundle.errors import RedisError

Client = aioredis.Redis | RedisCluster


async def connect(url: str, **options: Any) -> Client:
    """A connected client for ``url``; RedisError with a clear line if it cannot be."""
    validate_redis_url(url)
    options.setdefault("decode_responses", True)
    probe = aioredis.from_url(url, **options)
    try:
        info = await probe.info("cluster")
    except AuthenticationError:
        await probe.aclose()
        raise RedisError(f"Redis at {redact_url(url)} refused the password") from None
    except (_RedisPyError, OSError) as exc:
        await probe.aclose()
        raise RedisError(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
    if int(info.get("cluster_enabled", 0)) != 1:
        return probe
    await probe.aclose()
    cluster = RedisCluster.from_url(url, **options)
    await cluster.initialize()
    return cluster
