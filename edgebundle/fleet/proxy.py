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
:data:`MAX_REQUEST_BYTES`.

Redis Cluster: the proxy listens on one port per node (from ``--listen``'s port up)
and rewrites the node addresses in ``CLUSTER SLOTS`` replies and in ``MOVED``/``ASK``
redirections to its own, so a device's cluster client only ever talks to the proxy.
Nodes are found when the proxy starts; restart it after adding nodes.

Errors: :class:`edgebundle.errors.RedisError` when the upstream Redis cannot be reached
at start, :class:`edgebundle.errors.UsageError` for a bad address or TLS files.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from edgebundle.config import redact_url, validate_redis_url
from edgebundle.errors import RedisError, UsageError
from edgebundle.sync import keys as sync_keys
from edgebundle.sync import lua

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024  # one command with all its arguments
MAX_ARGUMENTS = 1024 * 1024
MAX_PENDING = 1024  # replies owed to one device before the proxy stops reading its commands
CONNECT_TIMEOUT = 5.0  # s to open and authenticate an upstream connection
LINE_LIMIT = 64 * 1024  # a RESP header line; bulk data is read by length

# The sync functions of any library version (eb_<12 hex>_<name>); never the fleet's.
_SYNC_NAMES = "|".join(sorted([*lua.SYNC_FUNCTIONS, "version"]))
_SYNC_FUNCTION = re.compile(rf"eb_[0-9a-f]{{12}}_({_SYNC_NAMES})")
_THREAD_KEY = re.compile(rf"{re.escape(sync_keys.PREFIX)}:\{{([^{{}}]+)\}}(:.*)?", re.DOTALL)
_REDIRECT = re.compile(rb"-(MOVED|ASK) (\d+) (\S+):(\d+)\r\n")


class ProtocolViolation(Exception):
    """The device sent something that is not a RESP2 command we take; the connection
    is closed (after the error line, when there is one to send)."""


# ---------------------------------------------------------------- RESP2, bytes level

def encode_command(args: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def error_line(message: str) -> bytes:
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


async def read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    """One command (an array of bulk strings); None at a clean end of the stream."""
    try:
        header = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolViolation("ERR incomplete command") from None
        return None
    except asyncio.LimitOverrunError:
        raise ProtocolViolation("ERR Protocol error: line too long") from None
    if header[:1] != b"*":
        raise ProtocolViolation("ERR Protocol error: the edgebundle proxy takes RESP "
                                "arrays only, no inline commands")
    count = _length(header)
    if not 1 <= count <= MAX_ARGUMENTS:
        raise ProtocolViolation("ERR Protocol error: invalid multibulk length")
    args: list[bytes] = []
    total = 0
    for _ in range(count):
        line = await reader.readuntil(b"\r\n")
        if line[:1] != b"$":
            raise ProtocolViolation("ERR Protocol error: expected '$'")
        size = _length(line)
        total += size
        if size < 0 or total > MAX_REQUEST_BYTES:
            raise ProtocolViolation(
                f"ERR request larger than the proxy's limit of {MAX_REQUEST_BYTES} bytes")
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise ProtocolViolation("ERR Protocol error: bad bulk string")
        args.append(data[:-2])
    return args


def _length(line: bytes) -> int:
    try:
        return int(line[1:-2])
    except ValueError:
        raise ProtocolViolation("ERR Protocol error: invalid length") from None


_LINE_TYPES = frozenset(b"+-:_#,(")  # RESP2 and RESP3 types that are one line
_BLOB_TYPES = frozenset(b"$!=")  # length, then that many bytes
_AGGREGATES = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}  # items per count


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The raw bytes of one RESP2 or RESP3 reply from Redis (aggregates read whole; an
    attribute is returned with the reply it annotates)."""
    line = await reader.readuntil(b"\r\n")
    kind = line[0]
    if kind in _LINE_TYPES:
        return line
    if kind in _BLOB_TYPES:
        size = int(line[1:-2])
        if size < 0:
            return line
        data: bytes = await reader.readexactly(size + 2)
        return line + data
    if kind in _AGGREGATES:
        count = int(line[1:-2])
        parts = [line]
        for _ in range(max(count, 0) * _AGGREGATES[kind]):
            parts.append(await read_reply(reader))
        if kind == ord("|"):
            parts.append(await read_reply(reader))
        return b"".join(parts)
    raise ConnectionError(f"unexpected reply from Redis: {line[:40]!r}")


@dataclass
class Node:
    """One parsed reply: its type byte, its line (a one-line type), its data (a blob)
    or its items (an aggregate; a map's keys and values in turn)."""

    kind: bytes
    line: bytes = b""
    data: bytes | None = None
    items: list[Node] | None = None


def parse_reply(data: bytes, at: int = 0) -> tuple[Node, int]:
    """(node, end) of the reply at ``data[at:]``, for rewriting and encoding back."""
    end = data.index(b"\r\n", at)
    kind, body = data[at:at + 1], data[at + 1:end]
    if kind[0] in _LINE_TYPES:
        return Node(kind, line=body), end + 2
    if kind[0] in _BLOB_TYPES:
        size = int(body)
        if size < 0:
            return Node(kind, line=body), end + 2
        return Node(kind, data=data[end + 2:end + 2 + size]), end + 4 + size
    count = int(body)
    if count < 0:
        return Node(kind, line=body), end + 2
    items, at = [], end + 2
    for _ in range(count * _AGGREGATES[kind[0]]):
        item, at = parse_reply(data, at)
        items.append(item)
    return Node(kind, items=items), at


def encode_reply(node: Node) -> bytes:
    if node.items is not None:
        count = len(node.items) // _AGGREGATES[node.kind[0]]
        return b"%s%d\r\n" % (node.kind, count) + b"".join(map(encode_reply, node.items))
    if node.data is not None:
        return b"%s%d\r\n%s\r\n" % (node.kind, len(node.data), node.data)
    return node.kind + node.line + b"\r\n"


def _text(node: Node) -> str:
    return (node.data if node.data is not None else node.line).decode(errors="replace")


# ---------------------------------------------------------------- configuration

Address = tuple[str, int]


@dataclass(frozen=True)
class Upstream:
    """Where the central Redis is and who the proxy is there (its --redis-url)."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: ssl.SSLContext | None

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        validate_redis_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise UsageError(f"the proxy needs a redis:// or rediss:// URL, not {parts.scheme}://")
        context = ssl.create_default_context() if parts.scheme == "rediss" else None
        return cls(parts.hostname or "localhost", parts.port or 6379,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None, context)

    def auth_command(self) -> list[bytes] | None:
        if self.password is None:
            return None
        # AUTH <password> alone is refused when the default user has no password;
        # naming the default user is accepted then (any password), as redis-py does
        return [b"AUTH", (self.username or "default").encode(), self.password.encode()]


@dataclass
class Routes:
    """Which upstream node each proxy port stands for, and back (cluster only)."""

    advertised_host: str
    default_host: str  # a node listed with an empty host is on the host we asked
    to_upstream: dict[int, Address] = field(default_factory=dict)  # proxy port -> node
    to_proxy: dict[Address, int] = field(default_factory=dict)  # node -> proxy port

    def add(self, port: int, node: Address) -> None:
        self.to_upstream[port] = node
        self.to_proxy[node] = port

    def rewrite_slots(self, raw: bytes) -> bytes:
        """CLUSTER SLOTS with each node's address replaced by its proxy port's."""
        value, _ = parse_reply(raw)
        if value.items is None:
            return raw
        for entry in value.items:
            for node in (entry.items or [])[2:]:
                host, port_node = (node.items or [])[:2]
                address = (_text(host) or self.default_host, int(_text(port_node)))
                port = self.to_proxy.get(address)
                if port is not None:
                    node.items[0] = Node(b"$", data=self.advertised_host.encode())  # type: ignore[index]
                    node.items[1] = Node(b":", line=b"%d" % port)  # type: ignore[index]
        return encode_reply(value)

    def rewrite_redirect(self, raw: bytes) -> bytes:
        match = _REDIRECT.fullmatch(raw)
        if not match:
            return raw
        port = self.to_proxy.get((match[3].decode(), int(match[4])))
        if port is None:
            return raw
        return b"-%s %s %s:%d\r\n" % (match[1], match[2], self.advertised_host.encode(), port)


async def _open(address: Address, tls: ssl.SSLContext | None,
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(address[0], address[1], ssl=tls, limit=LINE_LIMIT,
                                server_hostname=address[0] if tls else None),
        CONNECT_TIMEOUT)


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                args: list[bytes]) -> bytes:
    writer.write(encode_command(args))
    await writer.drain()
    return await asyncio.wait_for(read_reply(reader), CONNECT_TIMEOUT)


# ---------------------------------------------------------------- one device connection

Rewrite = Callable[[bytes], bytes]


@dataclass
class _Reply:
    """One reply owed to the device, in order: read from an upstream (optionally
    rewritten, or dropped), or made here."""

    source: asyncio.StreamReader | None = None
    ready: bytes = b""
    rewrite: Rewrite | None = None
    discard: bool = False
    then_pipe: bool = False  # a subscription: from now on pass everything through


class _Session:
    def __init__(self, proxy: SyncProxy, node: Address,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.node = node
        self.reader = reader
        self.writer = writer
        self.device: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.privileged: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.replies: asyncio.Queue[_Reply | None] = asyncio.Queue()
        self.db = b"0"
        self.in_multi = False
        self.asking = False
        self.piping = False
        self.privileged_db = b"0"
        self.protocol = b"2"  # RESP2 until a HELLO 3; the proxy's connection follows it
        self.privileged_protocol = b"2"
        # Back-pressure: a device that pipelines without reading its replies makes the
        # proxy stop reading its commands, so neither side's buffers grow without end.
        self.room = asyncio.Event()
        self.room.set()

    async def serve(self) -> None:
        pump = asyncio.create_task(self._pump())
        try:
            await self._read_commands()
        except (ProtocolViolation, asyncio.LimitOverrunError, ConnectionError,
                asyncio.IncompleteReadError, ssl.SSLError, OSError, TimeoutError) as exc:
            if isinstance(exc, ProtocolViolation):
                self.replies.put_nowait(_Reply(ready=error_line(str(exc))))
        finally:
            self.replies.put_nowait(None)
            try:
                await asyncio.wait_for(pump, 5)
            except (TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                pump.cancel()
            for conn in (self.device, self.privileged):
                if conn is not None:
                    conn[1].close()
            self.writer.close()

    def _owe(self, reply: _Reply) -> None:
        self.replies.put_nowait(reply)
        if self.replies.qsize() >= MAX_PENDING:
            self.room.clear()

    async def _drain_upstreams(self) -> None:
        for conn in (self.device, self.privileged):
            if conn is not None:
                await conn[1].drain()
        await self.room.wait()

    def _refuse(self, message: str) -> None:
        self._owe(_Reply(ready=error_line(message)))

    async def _read_commands(self) -> None:
        while True:
            args = await read_command(self.reader)
            if args is None or self._device_gone():
                return
            name = args[0].lower()
            if name == b"auth":
                if len(args) in (2, 3):
                    await self._authenticate(args)
                else:
                    self._refuse("ERR wrong number of arguments for 'auth' command")
            elif name == b"quit":
                self._owe(_Reply(ready=b"+OK\r\n"))
                return
            elif name == b"hello":
                await self._hello(args)
            elif name == b"reset":
                self._refuse("ERR RESET is not available through the edgebundle proxy: "
                             "reconnect instead")
            elif self.device is None:
                self._refuse("NOAUTH Authentication required.")
            elif name in (b"fcall", b"fcall_ro"):
                await self._fcall(args)
            else:
                self._forward(name, args)
            await self._drain_upstreams()

    def _device_gone(self) -> bool:
        """Redis closed the device's own connection: its user was deleted (revoked) or
        Redis went away. The device's connection ends with it, as a direct one would,
        even when the command would have gone to the proxy's connection."""
        return self.device is not None and self.device[0].at_eof()

    async def _authenticate(self, args: list[bytes]) -> None:
        """AUTH, or HELLO with AUTH: Redis checks the credentials, on a new connection
        that becomes the device's own when they are right."""
        try:
            reader, writer = await _open(self.node, self.proxy.upstream.tls)
            answer = await _call(reader, writer, args)
            accepted = not answer.startswith((b"-", b"!"))
            if accepted and self.db != b"0":
                selected = await _call(reader, writer, [b"SELECT", self.db])
                accepted = selected.startswith(b"+")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.warning("proxy: cannot reach Redis at %s:%d: %s", *self.node, exc)
            self._refuse("ERR the edgebundle proxy cannot reach Redis")
            return
        if not accepted:
            writer.close()
            self._owe(_Reply(ready=answer))
            return
        if self.device is not None:
            self.device[1].close()
        self.device = (reader, writer)
        if args[0].lower() == b"hello":
            self.protocol = args[1]
        self._owe(_Reply(ready=answer))

    async def _hello(self, args: list[bytes]) -> None:
        if len(args) > 1 and args[1] not in (b"2", b"3"):
            self._refuse("NOPROTO unsupported protocol version")
        elif any(arg.lower() == b"setname" for arg in args[2:]):
            self._refuse("ERR the edgebundle proxy takes HELLO [2|3] [AUTH user pass] only")
        elif len(args) == 5 and args[2].lower() == b"auth":
            await self._authenticate(args)
        elif len(args) > 2:
            self._refuse("ERR syntax error in HELLO option")
        elif self.device is None:
            self._refuse("NOAUTH HELLO must be called with the client already authenticated, "
                         "otherwise the HELLO <proto> AUTH <user> <pass> option can be used")
        else:
            if len(args) == 2:
                self.protocol = args[1]
            self._forward(b"hello", args)

    def _forward(self, name: bytes, args: list[bytes]) -> None:
        assert self.device is not None
        reader, writer = self.device
        writer.write(encode_command(args))
        if self.piping:
            return
        reply = _Reply(source=reader, rewrite=self._rewrite_redirect)
        if name == b"select" and len(args) == 2:
            self.db = args[1]
        elif name == b"multi":
            self.in_multi = True
        elif name in (b"exec", b"discard"):
            self.in_multi = False
        elif name == b"asking":
            self.asking = True
        elif name in (b"subscribe", b"psubscribe", b"ssubscribe"):
            reply = _Reply(then_pipe=True)
            self.piping = True
        elif name == b"cluster" and len(args) == 2 and args[1].lower() == b"slots" \
                and self.proxy.routes is not None:
            reply.rewrite = self.proxy.routes.rewrite_slots
        self._owe(reply)

    def _rewrite_redirect(self, raw: bytes) -> bytes:
        if self.proxy.routes is None or not raw.startswith((b"-MOVED", b"-ASK")):
            return raw
        return self.proxy.routes.rewrite_redirect(raw)

    async def _fcall(self, args: list[bytes]) -> None:
        refusal = self._fcall_refusal(args)
        if refusal:
            self._refuse(refusal)
            return
        if self.privileged is None:
            try:
                self.privileged = await self.proxy.open_privileged(self.node, self.db,
                                                                   self.protocol)
            except (OSError, asyncio.IncompleteReadError, TimeoutError,
                    RedisError) as exc:
                log.warning("proxy: cannot open its own connection to Redis at %s:%d: %s",
                            *self.node, exc)
                self._refuse("ERR the edgebundle proxy cannot reach Redis")
                return
            self.privileged_db = self.db
            self.privileged_protocol = self.protocol
        reader, writer = self.privileged
        if self.privileged_protocol != self.protocol:
            writer.write(encode_command([b"HELLO", self.protocol]))
            self._owe(_Reply(source=reader, discard=True))
            self.privileged_protocol = self.protocol
        if self.privileged_db != self.db:
            writer.write(encode_command([b"SELECT", self.db]))
            self._owe(_Reply(source=reader, discard=True))
            self.privileged_db = self.db
        if self.asking:
            writer.write(encode_command([b"ASKING"]))
            self._owe(_Reply(source=reader, discard=True))
            self.asking = False
        writer.write(encode_command(args))
        self._owe(_Reply(source=reader, rewrite=self._rewrite_redirect))

    def _fcall_refusal(self, args: list[bytes]) -> str | None:
        if self.piping or self.in_multi:
            return ("ERR the edgebundle proxy runs FCALL on a connection of its own: not "
                    "inside MULTI or a subscription")
        name = args[1].decode(errors="replace") if len(args) > 1 else ""
        if not _SYNC_FUNCTION.fullmatch(name):
            command = args[0].decode(errors="replace").lower()
            return (f"NOPERM this user has no permissions to run the '{command}' command "
                    f"with function {name!r}: devices call edgebundle's sync functions only")
        try:
            count = int(args[2])
        except (IndexError, ValueError):
            return "ERR Bad number of keys provided"
        named = args[3:3 + count]
        if count < 0 or len(named) != count:
            return "ERR Bad number of keys provided"
        threads = set()
        for key in named:
            match = _THREAD_KEY.fullmatch(key.decode(errors="replace"))
            if not match:
                return ("NOPERM this user has no permissions to access one of the keys used "
                        "as arguments: the sync functions take a thread's keys only")
            threads.add(match[1])
        if len(threads) > 1:
            return "NOPERM one function call names the keys of one thread only"
        return None

    async def _pump(self) -> None:
        """Send the owed replies in order; after a subscription, everything as it comes."""
        while True:
            reply = await self.replies.get()
            if self.replies.qsize() <= MAX_PENDING // 2:
                self.room.set()
            if reply is None:
                await self._flush()
                return
            if reply.then_pipe:
                assert self.device is not None
                await self._pipe(self.device[0])
                return
            if reply.source is None:
                self.writer.write(reply.ready)
            else:
                try:
                    raw = await read_reply(reply.source)
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    self.writer.close()  # the upstream went away: so does the device
                    return
                if not reply.discard:
                    self.writer.write(reply.rewrite(raw) if reply.rewrite else raw)
            await self._flush()  # returns at once unless the device is not reading

    async def _pipe(self, source: asyncio.StreamReader) -> None:
        while chunk := await source.read(65536):
            self.writer.write(chunk)
            await self._flush()
        self.writer.close()

    async def _flush(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass


# ---------------------------------------------------------------- the server

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

    async def open_privileged(self, node: Address, db: bytes, protocol: bytes = b"2",
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``node`` as the proxy's own user, on database ``db``."""
        reader, writer = await _open(node, self.upstream.tls)
        for command in (self.upstream.auth_command(),
                        [b"SELECT", db] if db != b"0" else None,
                        [b"HELLO", protocol] if protocol != b"2" else None):
            if command is None:
                continue
            answer = await _call(reader, writer, command)
            if answer.startswith((b"-", b"!")):
                writer.close()
                raise RedisError(f"Redis refused the proxy's {command[0].decode()}: "
                                 f"{answer.decode(errors='replace').strip()}")
        return reader, writer

    async def _nodes(self) -> list[Address]:
        """The cluster's nodes (primaries and replicas), or [] for a standalone Redis."""
        address = (self.upstream.host, self.upstream.port)
        try:
            reader, writer = await self.open_privileged(address, b"0")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            raise RedisError(f"the proxy cannot reach Redis at "
                             f"{redact_url(self.upstream_url)}: {exc}") from None
        try:
            raw = await _call(reader, writer, [b"CLUSTER", b"SLOTS"])
        finally:
            writer.close()
        if raw.startswith(b"-"):
            return []  # "This instance has cluster support disabled"
        slots, _ = parse_reply(raw)
        nodes: list[Address] = []
        for entry in slots.items or []:
            for node in (entry.items or [])[2:]:
                host, port = (node.items or [])[:2]
                address = (_text(host) or self.upstream.host, int(_text(port)))
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
                await _Session(self, node, reader, writer).serve()
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
