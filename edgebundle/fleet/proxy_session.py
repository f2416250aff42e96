"""One device's connection through the sync proxy (:mod:`edgebundle.fleet.proxy`):
its two upstream connections, the routing of its commands and the order of replies.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from edgebundle import keys as sync_keys
from edgebundle.config import validate_redis_url
from edgebundle.errors import RedisAccessError, UsageError
from edgebundle.fleet.resp import (
    Address,
    Node,
    ProtocolViolation,
    call,
    connect,
    encode_command,
    encode_reply,
    error_line,
    node_text,
    parse_reply,
    read_command,
    read_reply,
)
from edgebundle.sync import lua

log = logging.getLogger(__name__)

MAX_PENDING = 1024  # replies owed to one device before the proxy stops reading its commands

# The sync functions of any library version (eb_<12 hex>_<name>); never the fleet's.
_SYNC_NAMES = "|".join(sorted([*lua.SYNC_FUNCTIONS, "version"]))
_SYNC_FUNCTION = re.compile(rf"eb_[0-9a-f]{{12}}_({_SYNC_NAMES})")
_THREAD_KEY = re.compile(rf"{re.escape(sync_keys.PREFIX)}:\{{([^{{}}]+)\}}(:.*)?", re.DOTALL)
_REDIRECT = re.compile(rb"-(MOVED|ASK) (\d+) (\S+):(\d+)\r\n")


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
                address = (node_text(host) or self.default_host, int(node_text(port_node)))
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


async def open_privileged(upstream: Upstream, node: Address, db: bytes, protocol: bytes = b"2",
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``node`` as the proxy's own user, on database ``db``."""
    reader, writer = await connect(node, upstream.tls)
    for command in (upstream.auth_command(),
                    [b"SELECT", db] if db != b"0" else None,
                    [b"HELLO", protocol] if protocol != b"2" else None):
        if command is None:
            continue
        answer = await call(reader, writer, command)
        if answer.startswith((b"-", b"!")):
            writer.close()
            raise RedisAccessError(f"Redis refused the proxy's {command[0].decode()}: "
                             f"{answer.decode(errors='replace').strip()}")
    return reader, writer


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


def _unreachable(node: Address, exc: BaseException) -> ConnectionError:
    """Redis cannot be reached: the device's connection is closed, as a direct one would
    be, so its client reconnects with backoff and rides out a restart (an error reply
    would reach it as a refusal, not as a lost connection)."""
    log.warning("proxy: cannot reach Redis at %s:%d: %s", *node, exc)
    return ConnectionError(f"Redis at {node[0]}:{node[1]} unreachable")


class DeviceSession:
    """One device connection: ``serve()`` until either side ends it."""

    def __init__(self, upstream: Upstream, routes: Routes | None, node: Address,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.routes = routes
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
            reader, writer = await connect(self.node, self.upstream.tls)
            answer = await call(reader, writer, args)
            accepted = not answer.startswith((b"-", b"!"))
            if accepted and self.db != b"0":
                selected = await call(reader, writer, [b"SELECT", self.db])
                accepted = selected.startswith(b"+")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            raise _unreachable(self.node, exc) from None
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
                and self.routes is not None:
            reply.rewrite = self.routes.rewrite_slots
        self._owe(reply)

    def _rewrite_redirect(self, raw: bytes) -> bytes:
        if self.routes is None or not raw.startswith((b"-MOVED", b"-ASK")):
            return raw
        return self.routes.rewrite_redirect(raw)

    async def _fcall(self, args: list[bytes]) -> None:
        refusal = self._fcall_refusal(args)
        if refusal:
            self._refuse(refusal)
            return
        if self.privileged is None:
            try:
                self.privileged = await open_privileged(self.upstream, self.node, self.db,
                                                                   self.protocol)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                raise _unreachable(self.node, exc) from None
            except RedisAccessError as exc:  # Redis refused the proxy's own credentials
                log.warning("proxy: %s", exc)
                self._refuse("ERR the edgebundle proxy cannot log in to Redis")
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


