"""Agent and fleet events: reading the streams, and the events written without a lease.

Each agent has its own event stream (written by fenced writes, :mod:`~agentos.store.writes`)
and every event is copied to the fleet feed, sharded so that it runs on Redis Cluster;
an event's id in the feed is a cursor over every shard (:mod:`agentos.store.streams`).
A daemon records here, without a lease, what it saw happen to an agent it no longer
holds and the events of the fleet itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from agentos.store import streams
from agentos.store.conn import Conn
from agentos.store.errors import StoreError, translate
from agentos.store.keys import event_fields as _event_fields
from agentos.store.records import EVENTS_MAXLEN, FLEET_EVENTS_MAXLEN, Event, _s

__all__ = ["Events"]


def _event_order(key: tuple[int, int], fields: Mapping[str, str]) -> tuple[float, int, int]:
    # Shards' entry ids tie within a millisecond; the event's own time orders them.
    try:
        at = float(json.loads(fields.get("event", "{}")).get("time", 0.0))
    except (ValueError, AttributeError):
        at = 0.0
    return (at or key[0] / 1000, *key)


def _event(entry_id: str, fields: Mapping[str, str], name: str | None) -> Event:
    body = json.loads(fields.get("event", "{}"))
    return Event(
        id=entry_id,
        agent=fields.get("agent", name or ""),
        time=float(body.get("time", 0.0)),
        type=body.get("type", ""),
        reason=body.get("reason", ""),
        message=body.get("message", ""),
        daemon=body.get("daemon", ""),
    )


class Events:
    """Agent and fleet event streams (``store.events``; ``read`` was ``Store.events``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self.cluster = conn.cluster

    @translate
    async def read(
        self,
        name: str | None = None,
        *,
        count: int = 50,
        after_id: str | None = None,
        block_ms: int | None = None,
        poll_s: float = streams.POLL_S,
    ) -> list[Event]:
        """Events of one agent (or the fleet when ``name`` is None), oldest first.

        Without ``after_id`` returns the newest ``count``; with it, those after it,
        waiting up to ``block_ms`` for new ones when given. On a cluster the fleet's
        shards cannot be read in one blocking read: they are looked at every ``poll_s``.
        """
        if not name:
            return await self._fleet_events(
                count=count, after_id=after_id, block_ms=block_ms, poll_s=poll_s
            )
        stream = self.keys.events(name)
        if after_id is None:
            entries = list(reversed(await self._r.xrevrange(stream, count=count)))
        elif block_ms is not None:
            reply = await self._r.xread({stream: after_id}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = await self._r.xrange(stream, min=f"({after_id}", count=count)
        return [
            _event(_s(entry_id), {_s(a): _s(b) for a, b in fields.items()}, name)
            for entry_id, fields in entries
        ]

    async def _fleet_events(
        self, *, count: int, after_id: str | None, block_ms: int | None, poll_s: float
    ) -> list[Event]:
        # The feed is sharded: an event's id is a cursor over every shard (see
        # agentos.store.streams), so following the feed works as with one stream.
        feeds = self.keys.feed_streams()
        if after_id is None:
            entries = await streams.tail(self._r, feeds, count, order=_event_order)
        else:
            try:
                entries = await streams.read_after(
                    self._r,
                    feeds,
                    after_id,
                    count=count,
                    block_ms=block_ms,
                    cluster=self.cluster,
                    order=_event_order,
                    poll_s=poll_s,
                )
            except ValueError as e:
                raise StoreError(str(e)) from None
        return [_event(cursor, fields, "") for cursor, _, _, fields in entries]

    @translate
    async def record_agent_event(
        self, agent: str, type_: str, reason: str, message: str, daemon: str
    ) -> None:
        """Add an event to an agent's stream and the fleet feed without a lease: what a
        daemon saw happen to an agent it no longer holds (a lease it lost)."""
        fields = _event_fields(agent, time.time(), type_, reason, message, daemon)
        await self._r.xadd(self.keys.events(agent), fields, maxlen=EVENTS_MAXLEN, approximate=True)
        await self.record_fleet_event(agent, type_, reason, message, daemon)

    @translate
    async def record_fleet_event(
        self, agent: str, type_: str, reason: str, message: str, daemon: str
    ) -> None:
        """Add one event to the fleet feed (``agent`` empty for events of the fleet itself)."""
        await self._r.xadd(
            self.keys.fleet_events(self.keys.feed_shard(agent)),
            _event_fields(agent, time.time(), type_, reason, message, daemon),
            maxlen=FLEET_EVENTS_MAXLEN,
            approximate=True,
        )
