"""Each agent's log in Redis: the last lines its code and the runtime wrote about it.

``ctx.log`` lines (and every runtime line logged while the agent's runner ran) are kept
in a capped stream per agent, in the agent's own slot, so ``agentos logs NAME`` shows
them from any machine, and ``-f`` follows them, whichever daemon runs the agent now. The
stream keeps the newest :data:`LOG_MAXLEN` lines and expires :data:`LOG_TTL_S` after
the last one: an agent that stops logging costs nothing after that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentos.core.machine import rfc3339
from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.raw import RawReply
from agentos.store.records import _s

__all__ = ["LOG_MAXLEN", "LOG_TTL_S", "LogLine", "Logs"]

LOG_MAXLEN = 500
"""Lines kept per agent (approximately: trimmed in whole stream nodes)."""
LOG_TTL_S = 3 * 86_400
"""An agent's log expires this long after its last line."""
MAX_LINE_CHARS = 4000
"""A longer line is cut (with a marker) before it is stored."""


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of an agent's log."""

    id: str
    agent: str
    time: float
    level: str
    logger: str
    message: str
    task: str
    daemon: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON and YAML output."""
        return {
            "time": rfc3339(self.time),
            "agent": self.agent,
            "level": self.level,
            "logger": self.logger,
            "message": self.message,
            "task": self.task or None,
            "daemon": self.daemon,
        }


def _line(agent: str, entry_id: RawReply, fields: Mapping[RawReply, RawReply]) -> LogLine:
    f = {_s(k): _s(v) for k, v in fields.items()}
    return LogLine(
        _s(entry_id),
        agent,
        float(f.get("time") or 0.0),
        f.get("level", ""),
        f.get("logger", ""),
        f.get("message", ""),
        f.get("task", ""),
        f.get("daemon", ""),
    )


class Logs:
    """Agents' logs (``store.logs``; ``read`` was ``Store.logs``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys

    @translate
    async def append(self, lines: Mapping[str, Sequence[Mapping[str, str]]]) -> None:
        """Append each agent's lines (fields: time, level, logger, message, task, daemon)
        to its log, in one round trip per Redis node."""
        if not lines:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for agent, entries in lines.items():
                key = self.keys.logs(agent)
                for fields in entries:
                    message = fields.get("message", "")
                    if len(message) > MAX_LINE_CHARS:
                        message = message[:MAX_LINE_CHARS] + " … [cut]"
                    pipe.xadd(
                        key, {**fields, "message": message}, maxlen=LOG_MAXLEN, approximate=True
                    )
                pipe.expire(key, LOG_TTL_S)
            await pipe.execute()

    @translate
    async def read(
        self, agent: str, *, tail: int = 100, since: float | None = None
    ) -> list[LogLine]:
        """The agent's newest ``tail`` lines (only those at or after ``since``, epoch
        seconds), oldest first."""
        key = self.keys.logs(agent)
        start = f"{int(since * 1000)}-0" if since is not None else "-"
        entries = await self._r.xrevrange(key, "+", start, count=tail)
        return [_line(agent, i, f) for i, f in reversed(entries)]

    @translate
    async def after(
        self, agent: str, cursor: str, *, block_ms: int | None = None, count: int = 500
    ) -> list[LogLine]:
        """Lines after ``cursor`` (a line's id, or ``$``-like ``0-0``), waiting up to
        ``block_ms`` for one when given."""
        key = self.keys.logs(agent)
        if block_ms is None:
            entries = await self._r.xrange(key, f"({cursor}", "+", count=count)
        else:
            reply = await self._r.xread({key: cursor}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [_line(agent, i, f) for i, f in entries]
