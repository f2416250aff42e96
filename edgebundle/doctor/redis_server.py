"""What one doctor run learns about the sync Redis: a client per primary, who it is.

One attempt, one-second timeouts, no retries: a doctor must answer quickly. Passwords
never reach a message (:func:`scrub`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import redis

TIMEOUT_SECONDS = 1.0


def location(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def scrub(message: str, url: str) -> str:
    password = urlsplit(url).password
    return message.replace(password, "***") if password else message


def client_for(url: str) -> redis.Redis:
    # Imported here: redis-py takes ~0.1 s to import, and offline doctor never needs it.
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS,
                                socket_connect_timeout=TIMEOUT_SECONDS,
                                retry=Retry(NoBackoff(), 0), decode_responses=True)


@dataclass
class Server:
    """What one doctor run learnt about the Redis, and a client per primary."""

    url: str
    client: redis.Redis
    user: str
    name: str  # redis, valkey …
    version: tuple[int, ...]
    version_text: str
    cluster: bool
    primaries: list[tuple[str, redis.Redis]]  # (host:port, client): the node itself if standalone

    def close(self) -> None:
        for _, node in self.primaries:
            if node is not self.client:
                node.close()
        self.client.close()


def connect(url: str) -> Server:
    import redis

    client = client_for(url)
    try:
        hello = command(client, "HELLO")
        info = hello if isinstance(hello, dict) else dict(zip(hello[::2], hello[1::2], strict=True))
        text = str(info.get("version", "0"))
        version = tuple(int(part) for part in text.split(".") if part.isdigit())
        cluster = str(info.get("mode")) == "cluster"
        try:
            user = str(command(client, "ACL", "WHOAMI"))
        except redis.ResponseError:
            user = urlsplit(url).username or "default"
        primaries: list[tuple[str, redis.Redis]] = [(location(url), client)]
        if cluster:
            primaries = [(f"{host}:{port}", client if (host, port) == _address(client)
                          else _node(url, host, port))
                         for host, port in _cluster_primaries(client)]
    except BaseException:
        client.close()
        raise
    return Server(url, client, user, str(info.get("server", "redis")), version, text, cluster,
                  primaries)


def command(client: redis.Redis, *args: Any) -> Any:
    """One command, whatever it is (redis-py's sync execute_command is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _address(client: redis.Redis) -> tuple[str, int]:
    kwargs = client.connection_pool.connection_kwargs
    return str(kwargs.get("host")), int(kwargs.get("port", 6379))


def _node(url: str, host: str, port: int) -> redis.Redis:
    """A client of one cluster node: ``url`` (user, password, scheme, db) at host:port."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]" if ":" in host else host
    netloc = f"{userinfo}@{address}:{port}" if userinfo else f"{address}:{port}"
    return client_for(parts._replace(netloc=netloc).geturl())


def _cluster_primaries(client: redis.Redis) -> list[tuple[str, int]]:
    """(host, port) of every primary that serves slots, from CLUSTER SLOTS
    (``[[start, end, [host, port, id, …], replicas…], …]``)."""
    return sorted({(str(entry[2][0]), int(entry[2][1]))
                   for entry in command(client, "CLUSTER SLOTS")})


def may(server: Server, *words: str) -> bool:
    """Whether this user may run the command ``words`` (ACL DRYRUN; False when it may not
    even ask)."""
    import redis

    try:
        return str(command(server.client, "ACL", "DRYRUN", server.user, *words)) == "OK"
    except redis.ResponseError:
        return False
