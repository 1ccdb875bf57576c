"""Each agent's log lines, collected in the daemon and shipped to the agent's log in Redis.

``ctx.log`` is a standard logger (``agentos.agent.NAME``); the runtime logs about an
agent through ``agentos.runner``. While an agent's runner runs, :data:`current_agent`
(a context variable, inherited by its tasks and worker threads) names the agent, so
every line logged on its behalf, by its code, its tools or the runtime, is attributed
to it by :class:`AgentLogHandler`. The handler only buffers (agent code must never wait
for Redis to log); :class:`LogShipper` sends the buffer every ``period_s`` in one round
trip per node (:meth:`agentos.store.Store.append_logs`). A full buffer drops lines and
counts them; a Redis that is down loses the batch, with one warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator

import anyio

from agentos.store import Store, StoreError

__all__ = ["AgentLogHandler", "LogShipper", "attributed", "current_agent", "current_task"]

log = logging.getLogger("agentos.daemon")

current_agent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "agentos_agent", default=None
)
current_task: contextvars.ContextVar[str] = contextvars.ContextVar("agentos_task", default="")

MAX_BUFFERED = 20_000
# Loggers that must reach the handler at INFO even when the process logs at WARNING.
_AGENT_LOGGERS = ("agentos.agent", "agentos.runner")


@contextlib.contextmanager
def attributed(agent: str) -> Iterator[None]:
    """Lines logged inside belong to ``agent`` (the runner wraps its whole run)."""
    token = current_agent.set(agent)
    try:
        yield
    finally:
        current_agent.reset(token)


class AgentLogHandler(logging.Handler):
    """Buffers the records logged on an agent's behalf, by agent (thread-safe)."""

    def __init__(self, daemon_id: str, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.daemon_id = daemon_id
        self._pending: dict[str, list[dict[str, str]]] = {}
        self._count = 0
        self._guard = threading.Lock()
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        agent = current_agent.get() or getattr(record, "agent", None)
        if not isinstance(agent, str) or not agent:
            return
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                message += f" ({type(error).__name__}: {error})"
        except Exception:  # a bad format string in agent code is not our crash
            message = str(record.msg)
        fields = {
            "time": repr(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "task": current_task.get(),
            "daemon": self.daemon_id,
        }
        with self._guard:
            if self._count >= MAX_BUFFERED:
                self.dropped += 1
                return
            self._pending.setdefault(agent, []).append(fields)
            self._count += 1

    def take(self) -> dict[str, list[dict[str, str]]]:
        """What was buffered since the last take, by agent."""
        with self._guard:
            batch, self._pending, self._count = self._pending, {}, 0
        return batch


class LogShipper:
    """Installs an :class:`AgentLogHandler` and ships what it buffers (a daemon's loop)."""

    def __init__(self, store: Store, daemon_id: str, *, period_s: float = 0.25) -> None:
        self.store = store
        self.handler = AgentLogHandler(daemon_id)
        self.period_s = period_s
        self._levels: dict[str, int] = {}
        self._failing = False

    def install(self) -> None:
        """Attach the handler to the root logger; agents' loggers log at INFO at least."""
        logging.getLogger().addHandler(self.handler)
        for name in _AGENT_LOGGERS:
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() > logging.INFO:
                self._levels[name] = logger.level
                logger.setLevel(logging.INFO)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()

    async def run(self) -> None:
        """Ship the buffer every ``period_s`` until cancelled (then once more)."""
        try:
            while True:
                await anyio.sleep(self.period_s)
                await self.ship()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self.ship()

    async def ship(self) -> None:
        batch = self.handler.take()
        if not batch:
            return
        try:
            await self.store.logs.append(batch)
        except StoreError as e:
            if not self._failing:  # one warning per outage, not one per batch
                log.warning("agent logs not stored (Redis: %s); lines are dropped", e)
            self._failing = True
            return
        self._failing = False
