"""redis-py's asyncio cluster client, taught where XREAD and XREADGROUP keep their keys.

The cluster client must know a command's keys to route it. For commands whose keys have
no fixed position ("movablekeys"), redis-py asks a node with ``COMMAND GETKEYS`` — a
round trip of its own before every such command. Stream reads are exactly such commands
and agentos sends them on its hot path (inbox reads, signal reads), so this subclass
finds their keys locally: every key follows ``STREAMS``, one id per key after them.
"""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from agentos.store.raw import RawArg

__all__ = ["AgentosCluster"]

_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})


class AgentosCluster(RedisCluster):
    """:class:`RedisCluster` that routes XREAD/XREADGROUP without a GETKEYS round trip."""

    async def _determine_slot(self, command: str, *args: RawArg) -> int:
        if command.upper() in _STREAM_READS:
            upper = [a.upper() if isinstance(a, str) else a for a in args]
            for marker in ("STREAMS", b"STREAMS"):
                if marker in upper:
                    at = upper.index(marker) + 1
                    rest = args[at:]
                    keys = rest[: len(rest) // 2]
                    slots = {self.keyslot(k) for k in keys}
                    if len(slots) == 1:
                        return slots.pop()
                    break  # several slots: let redis-py raise its own error
        return int(await super()._determine_slot(command, *args))
