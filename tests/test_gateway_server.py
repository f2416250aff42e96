"""The gateway's listening socket: what asyncio does with the connections it accepts.

Real sockets on loopback, a real asyncio server on the socket ``bind`` returns."""

from __future__ import annotations

import asyncio
import socket

import pytest

from edgebundle.errors import SupervisorError
from edgebundle.gateway.listen import bind


def test_accepted_connections_send_without_waiting_for_acks() -> None:
    """TCP_NODELAY on: an SSE event after the headers leaves at once, instead of waiting
    for the client's delayed ACK (up to 40 ms before each first token)."""

    async def main() -> int:
        listening = bind("127.0.0.1", 0)
        port = listening.getsockname()[1]
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return await asyncio.wait_for(seen, 5)
            finally:
                writer.close()

    assert asyncio.run(main()) == 1


def test_a_taken_port_is_one_clear_error() -> None:
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(SupervisorError, match="already in use"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
