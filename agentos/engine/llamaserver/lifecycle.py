"""The embedded llama.cpp server's life: stopped when idle, started again by the next call.

An embedded server that has had no call for ``idle_stop_s`` (the Model's ``idleStop``)
is stopped by a watcher thread, and the next call starts it again and waits for it
(seconds; a start that fails is :class:`EngineUnavailable`, infrastructure, never the
agent's crash); a server that died on its own is started again the same way. Calls in
flight are counted, so a long stream keeps its server up. The engine is told of each
new server process (``on_restart``: its slots are empty, its port may differ).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import anyio.to_thread

from agentos.engine.base import EngineError, EngineUnavailable
from agentos.engine.llamaserver.state import LlamaServerStats
from agentos.engine.llamaserver_child import EmbeddedServer

__all__ = ["ServerLife"]

log = logging.getLogger("agentos.engine.llamaserver")

_START_ATTEMPTS = 3  # a call starts a down embedded server at most this often


class ServerLife:
    """Whether the embedded server runs, the calls in flight, and the idle watcher.

    Lock order: ``_life`` (held while the server starts or stops) before ``_state``
    (calls in flight). The server was started by whoever built it; :meth:`watch` takes
    it from there.
    """

    def __init__(
        self,
        server: EmbeddedServer,
        *,
        model: str,
        idle_stop_s: float | None,
        stats: LlamaServerStats,
        on_restart: Callable[[EmbeddedServer], None],
    ) -> None:
        self.server = server
        self.idle_stop_s = idle_stop_s
        self._model = model
        self._stats = stats
        self._on_restart = on_restart
        self._life = threading.Lock()
        self._state = threading.Condition()
        self._in_flight = 0
        self._last_call = time.monotonic()  # its start took seconds
        self._running = True
        self._closing = False
        self.watcher: threading.Thread | None = None

    def watch(self) -> None:
        """Start the idle watcher (none without ``idle_stop_s``)."""
        if self.idle_stop_s is not None:
            self.watcher = threading.Thread(
                target=self._watch_idle, name=f"llamaserver-idle-{self._model}", daemon=True
            )
            self.watcher.start()

    @property
    def running(self) -> bool:
        """Whether the server is up (False when stopped for idleness)."""
        return self._running and self.server.alive

    def close(self) -> None:
        """Stop the watcher, then the server (blocking: a server takes seconds to stop)."""
        with self._state:
            self._closing = True
            self._state.notify_all()
        if self.watcher is not None:
            self.watcher.join()
        with self._life:
            self._running = False
            self.server.stop()

    async def awake(self) -> None:
        """Count a call in flight, starting the server first if it is down."""
        for _ in range(_START_ATTEMPTS):
            with self._state:
                if self._closing:
                    raise EngineUnavailable(f"model {self._model}: its engine is closing")
                if self._running and self.server.alive:
                    self._in_flight += 1
                    return
            await anyio.to_thread.run_sync(self._start_again)
        raise EngineUnavailable(
            f"model {self._model}: its embedded llama.cpp server exits as soon as it starts "
            f"(log: {self.server.log_path})"
        )

    def release(self) -> None:
        """A call counted by :meth:`awake` is over."""
        with self._state:
            self._in_flight -= 1
            self._last_call = time.monotonic()
            self._state.notify_all()

    def _start_again(self) -> None:
        """Start the stopped (or dead) server (blocking, seconds).

        Raises :class:`EngineUnavailable` when it does not start.
        """
        server = self.server
        with self._life:
            if self._closing or (self._running and server.alive):
                return
            why = "stopped while idle" if not self._running else "exited"
            started = time.perf_counter()
            try:
                server.start()
            except EngineError as e:
                raise EngineUnavailable(
                    f"model {self._model}: its embedded llama.cpp server ({why}) did not "
                    f"start again: {e}"
                ) from e
            self._on_restart(server)
            with self._state:
                self._running = True
                self._last_call = time.monotonic()  # a full idle period from now
                self._state.notify_all()
            log.info(
                "llamaserver model %s: embedded server started again (%s) in %.1fs",
                self._model,
                why,
                time.perf_counter() - started,
            )

    def _watch_idle(self) -> None:
        """Stop the server once it has had no call for ``idle_stop_s``."""
        assert self.idle_stop_s is not None
        idle_s = self.idle_stop_s
        while True:
            with self._state:
                while True:
                    if self._closing:
                        return
                    if self._running and not self._in_flight:
                        left = self._last_call + idle_s - time.monotonic()
                        if left <= 0:
                            break
                        self._state.wait(left)
                    else:
                        self._state.wait()
            # _life is held while it stops: a call that comes now waits for the stop,
            # then starts the server again.
            with self._life:
                with self._state:
                    idle = self._running and not self._in_flight and not self._closing
                    if not idle or time.monotonic() < self._last_call + idle_s:
                        continue
                    self._running = False
                self.server.stop()
                self._stats.idle_stops += 1
                log.info(
                    "llamaserver model %s: embedded server stopped after %s without calls",
                    self._model,
                    f"{idle_s:g}s",
                )
