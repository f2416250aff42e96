"""A small TCP proxy for tests: real sockets between a client and a server, cut on demand.

:meth:`TcpProxy.cut` closes every connection going through it (both sides), as a
restarted gateway or a network cut would; with ``hold=True`` new connections are
closed as soon as they arrive until :meth:`resume`, so a client has to retry.
:meth:`lose_answer` lets the next matching request reach the server and cuts its
connection as the answer begins, so the server did the work and the client never
hears of it (what a network cut at the worst moment does).
:meth:`stall` keeps every connection open and forwards nothing (a link that hangs
rather than breaks: requests sent meanwhile wait, unanswered) until :meth:`release`
forwards what waited.
It records the first bytes each client sent (the HTTP request head) so a test can
see how the client came back (for example with ``Last-Event-ID``).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.processes import free_port


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; start(), cut(), resume(), stop()."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.requests: list[bytes] = []  # the first chunk each client sent, in order
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._holding = False
        self._stopped = False
        self._answers_to_lose: list[bytes] = []  # request starts, each for one request
        self._losing: set[socket.socket] = set()  # clients whose answer is not forwarded
        self._flowing = threading.Event()  # cleared while stalled
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()
        return self

    def cut(self, *, hold: bool = False) -> int:
        """Close every open connection (and, with ``hold``, refuse new ones); how many."""
        with self._lock:
            self._holding = self._holding or hold
            victims = list(self._open)
            self._open.clear()
        for sock in victims:
            _close(sock)
        return len(victims) // 2

    def lose_answer(self, request_start: bytes) -> None:
        """Forward the next request whose head starts with ``request_start``, then close
        its connection before a byte of the answer reaches the client."""
        with self._lock:
            self._answers_to_lose.append(request_start)

    def resume(self) -> None:
        with self._lock:
            self._holding = False

    def stall(self) -> None:
        """Forward nothing, either way, on any connection (new ones too) until release()."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def stop(self) -> None:
        self._stopped = True
        self._flowing.set()  # stalled pumps go on, into closed sockets, and end
        _close(self._listener)
        self.cut()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                holding = self._holding
            if holding:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        first = from_client
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if first:
                    self._record(source, chunk)
                    first = False
                if not from_client and self._loses_answer_to(sink):
                    break  # the server answered: the client never hears of it
                self._flowing.wait()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
                self._losing.discard(source if from_client else sink)
            _close(source)
            _close(sink)

    def _record(self, client: socket.socket, request_head: bytes) -> None:
        with self._lock:
            self.requests.append(request_head)
            for start in self._answers_to_lose:
                if request_head.startswith(start):
                    self._answers_to_lose.remove(start)
                    self._losing.add(client)
                    return

    def _loses_answer_to(self, client: socket.socket) -> bool:
        with self._lock:
            return client in self._losing


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
