"""RESP (Redis's wire protocol) at the byte level, for the sync proxy.

The proxy passes Redis's replies through as bytes and parses only the few it rewrites
(CLUSTER SLOTS, MOVED/ASK), so it reads each reply whole by its length prefixes
instead of decoding it the way a client library does; redis-py's parsers decode
into Python values and cannot give the bytes back. Both RESP2 and RESP3 replies are
read (a device may say HELLO 3); commands from devices must be RESP arrays of bulk
strings (no inline commands), with :data:`MAX_REQUEST_BYTES` at most.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

MAX_REQUEST_BYTES = 64 * 1024 * 1024  # one command with all its arguments
MAX_ARGUMENTS = 1024 * 1024
CONNECT_TIMEOUT = 5.0  # s to open and authenticate an upstream connection
LINE_LIMIT = 64 * 1024  # a RESP header line; bulk data is read by length

Address = tuple[str, int]


class ProtocolViolation(Exception):
    """The device sent something that is not a RESP2 command we take; the connection
    is closed (after the error line, when there is one to send)."""


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


def node_text(node: Node) -> str:
    return (node.data if node.data is not None else node.line).decode(errors="replace")


async def connect(address: Address, tls: ssl.SSLContext | None,
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(address[0], address[1], ssl=tls, limit=LINE_LIMIT,
                                server_hostname=address[0] if tls else None),
        CONNECT_TIMEOUT)


async def call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                args: list[bytes]) -> bytes:
    writer.write(encode_command(args))
    await writer.drain()
    return await asyncio.wait_for(read_reply(reader), CONNECT_TIMEOUT)
