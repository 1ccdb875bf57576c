"""What an agent's fenced writes left behind, read back: its status hash and durable state.

Any process reads these without a lease (``agentos get``, ``describe``, a daemon that
opens the agent); only :mod:`~agentos.store.writes` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.records import _s

__all__ = ["Agents"]


class Agents:
    """Status and durable state of agents (``store.agents``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys

    @translate
    async def status(self, name: str) -> dict[str, str]:
        """The agent's status hash (empty when it never ran)."""
        raw = await self._r.hgetall(self.keys.status(name))
        return {_s(a): _s(b) for a, b in raw.items()}

    @translate
    async def statuses(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        """Status hashes of many agents in one round trip."""
        if not names:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.status(name))
            raw = await pipe.execute()
        return {
            name: {_s(a): _s(b) for a, b in h.items()} for name, h in zip(names, raw, strict=True)
        }

    @translate
    async def load_state(self, name: str) -> bytes | None:
        """The agent's durable state as saved by its last task, or None."""
        value = await self._r.get(self.keys.state(name))
        return bytes(value) if value is not None else None
