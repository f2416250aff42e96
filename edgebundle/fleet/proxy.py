"""The sync proxy: devices reach the central Redis through it, and only it may change a thread.

Why it exists. Redis runs a function under the caller's ACL user, keys included: there
is no "run as the function's owner". So a device user that may ``FCALL`` the sync
functions must also hold HSET, DEL, XADD … on every thread's keys, and a stolen device
credential can forge or delete any thread with plain commands. Behind the proxy a
device's user (``fleet provision --access proxied``, :func:`edgebundle.fleet.acl.
device_rules`) may only *read* thread keys, and holds no FCALL at all; the proxy runs
the sync functions for it under the proxy's own user. A stolen device credential then
changes a thread only the way the sync API does (push, start a run, …): what any
device of the fleet may do anyway, validated by the functions.

One device connection is two upstream connections:

- the **device's own**: opened at the device's ``AUTH`` and authenticated by Redis with
  the device's user and password (a wrong one is Redis's own WRONGPASS; revoking the
  user, ``ACL DELUSER``, closes it, and the proxy closes the device's connection with
  it). Every command but FCALL goes here, so Redis's ACL fences it exactly as if the
  device were connected directly: its own keys, the fleet's state read-only, thread
  keys read-only, its nudge channel;
- the **proxy's**: opened at the first FCALL, authenticated with the credentials in
  the proxy's ``--redis-url``. It runs ``FCALL``/``FCALL_RO`` of edgebundle's *sync*
  functions only (any library version, so two edgebundle versions can share the
  proxy while a fleet upgrades), and only when every key named is a key of one thread
  (``eb:{T}:…``): not the fleet controller's functions, not other keys.

Replies go back in the order the commands came (pipelining works), in RESP2 or, after
``HELLO 3``, RESP3 (both upstream connections follow the device's protocol); a device
that subscribes gets its channel's messages passed through as they come. Refused, with
an error and nothing forwarded: ``RESET`` (it would change who the upstream connection
is), ``HELLO … SETNAME``, FCALL inside ``MULTI`` or a subscription, commands before
``AUTH`` (or ``HELLO … AUTH``). Closed at once: inline commands and requests over
:data:`edgebundle.fleet.resp.MAX_REQUEST_BYTES`.

Redis Cluster: the proxy listens on one port per node (from ``--listen``'s port up)
and rewrites the node addresses in ``CLUSTER SLOTS`` replies and in ``MOVED``/``ASK``
redirections to its own, so a device's cluster client only ever talks to the proxy.
Nodes are found when the proxy starts; restart it after adding nodes.

Errors: :class:`edgebundle.errors.RedisAccessError` when the upstream Redis cannot be reached
at start, :class:`edgebundle.errors.UsageError` for a bad address or TLS files.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

from edgebundle.config import redact_url
from edgebundle.errors import RedisAccessError, UsageError
from edgebundle.fleet.proxy_session import DeviceSession, Routes, Upstream, open_privileged
from edgebundle.fleet.resp import LINE_LIMIT, Address, call, node_text, parse_reply


class SyncProxy:
    """The proxy's listeners: one for a standalone Redis, one per node of a cluster."""

    def __init__(self, upstream_url: str, *, host: str = "127.0.0.1", port: int = 6390,
                 advertise: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.upstream_url = upstream_url
        self.upstream = Upstream.from_url(upstream_url)
        self.host = host
        self.port = port
        self.advertise = advertise or host
        self.tls = tls
        self.routes: Routes | None = None
        self.servers: list[asyncio.Server] = []
        self.sessions: set[asyncio.Task[None]] = set()

    async def _nodes(self) -> list[Address]:
        """The cluster's nodes (primaries and replicas), or [] for a standalone Redis."""
        address = (self.upstream.host, self.upstream.port)
        try:
            reader, writer = await open_privileged(self.upstream, address, b"0")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            raise RedisAccessError(f"the proxy cannot reach Redis at "
                             f"{redact_url(self.upstream_url)}: {exc}") from None
        try:
            raw = await call(reader, writer, [b"CLUSTER", b"SLOTS"])
        finally:
            writer.close()
        if raw.startswith(b"-"):
            return []  # "This instance has cluster support disabled"
        slots, _ = parse_reply(raw)
        nodes: list[Address] = []
        for entry in slots.items or []:
            for node in (entry.items or [])[2:]:
                host, port = (node.items or [])[:2]
                address = (node_text(host) or self.upstream.host, int(node_text(port)))
                if address not in nodes:
                    nodes.append(address)
        return nodes

    async def start(self) -> list[int]:
        """Listen; the ports (one, or one per cluster node in the order found)."""
        nodes = await self._nodes()
        if not nodes:
            self.servers.append(await self._listen(self.port, (self.upstream.host,
                                                               self.upstream.port)))
        else:
            self.routes = Routes(self.advertise, self.upstream.host)
            for offset, node in enumerate(nodes):
                server = await self._listen(self.port + offset if self.port else 0, node)
                self.routes.add(server.sockets[0].getsockname()[1], node)
                self.servers.append(server)
        return [server.sockets[0].getsockname()[1] for server in self.servers]

    async def _listen(self, port: int, node: Address) -> asyncio.Server:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.sessions.add(task)
            try:
                await DeviceSession(self.upstream, self.routes, node, reader,
                                    writer).serve()
            finally:
                self.sessions.discard(task)

        try:
            return await asyncio.start_server(accept, self.host, port, ssl=self.tls,
                                              limit=LINE_LIMIT)
        except OSError as exc:
            raise UsageError(f"the proxy cannot listen on {self.host}:{port}: "
                             f"{exc.strerror or exc}") from None

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.sessions):
            task.cancel()
        for server in self.servers:
            await server.wait_closed()

    async def serve_forever(self, ready: Callable[[list[int]], Awaitable[None] | None]
                            | None = None) -> None:
        ports = await self.start()
        if ready is not None:
            outcome = ready(ports)
            if outcome is not None:
                await outcome
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of ``--listen``."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isascii() or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {value!r}: use HOST:PORT, e.g. 0.0.0.0:6390")
    return host, int(port)


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context devices connect with (rediss://), or None for plain TCP."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the proxy's TLS certificate: {exc}") from None
    return context
