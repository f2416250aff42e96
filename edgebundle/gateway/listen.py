"""The gateway's listening socket, bound before anything else starts (standard library
only: ``run`` binds it, then starts the guest, then imports the rest of the gateway)."""

from __future__ import annotations

import errno
import socket

from edgebundle.errors import SupervisorError, UsageError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; one clear error if that is not possible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # proto IPPROTO_TCP, not socket.create_server's 0: asyncio turns Nagle off
        # (TCP_NODELAY) only on accepted sockets whose proto says TCP. With Nagle on,
        # each event after a response's headers waited for the client's delayed ACK,
        # up to 40 ms before the first token.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SupervisorError(
                f"{host}:{port} is already in use by another process: stop it, or pass --port N"
            ) from None
        raise UsageError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host / --port"
        ) from None


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
