"""A TCP proxy on loopback that loses one reply on purpose.

Between a Store and a real Redis it forwards bytes both ways; armed with a marker, it
forwards the next request that contains the marker, and when the server answers it
swallows the reply and drops the client's connection. The client sees a cut
connection, the server has applied the command: exactly the case a retry must not
turn into a double write.
Threads, not the test's event loop, so the client under test cannot starve it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class CutProxy:
    """Forward ``127.0.0.1:port`` to the Redis at ``upstream_url``; see the module docstring."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._db = parts.path or "/0"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._sockets: list[socket.socket] = []
        self.cut = threading.Event()  # set once a reply was swallowed after a cut
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """The URL a client connects to instead of the server's."""
        return f"redis://127.0.0.1:{self.port}{self._db}"

    def cut_after(self, marker: bytes) -> None:
        """Cut the connection that sends the next request containing ``marker`` (at most
        64 bytes) once the server has answered it."""
        with self._lock:
            self.cut.clear()
            self._marker = marker

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._upstream)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            dropping = threading.Event()
            threading.Thread(
                target=self._up, args=(client, upstream, dropping), daemon=True
            ).start()
            threading.Thread(
                target=self._down, args=(client, upstream, dropping), daemon=True
            ).start()

    def _up(
        self, client: socket.socket, upstream: socket.socket, dropping: threading.Event
    ) -> None:
        tail = b""  # a marker may straddle two reads
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                _close(upstream)
                return
            with self._lock:
                window = tail + data
                if self._marker is not None and self._marker in window:
                    self._marker = None
                    self.cuts += 1
                    dropping.set()  # before forwarding: the reply must never reach the client
                tail = window[-64:]
            try:
                upstream.sendall(data)
            except OSError:
                _close(client)
                return

    def _down(
        self, client: socket.socket, upstream: socket.socket, dropping: threading.Event
    ) -> None:
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            if data and dropping.is_set():
                # The server answered the marked request: it was applied. Lose the reply.
                self.cut.set()
                data = b""
            if not data:
                _close(upstream)
                _close(client)
                return
            try:
                client.sendall(data)
            except OSError:
                _close(upstream)
                return


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
