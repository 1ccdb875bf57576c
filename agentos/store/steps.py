"""Steps several store repositories take: making agents due, nudging the daemons, copying
an event to the fleet feed, reading an inbox's depth, forgetting an agent's wait.

A send makes its agent due, an apply makes new agents due, a release looks at the inbox:
the repositories that do so (:mod:`~agentos.store.inbox`, :mod:`~agentos.store.specs`,
:mod:`~agentos.store.waits`, ...) call these functions over the shared
:class:`~agentos.store.conn.Conn` instead of calling each other, so that each repository
stands on its own. Each is the exact command sequence its repository sent before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from agentos.store.conn import Conn
from agentos.store.keys import Keys
from agentos.store.records import FLEET_EVENTS_MAXLEN, SIGNALS_MAXLEN

__all__ = [
    "after_enqueue",
    "due_now",
    "feed_copy",
    "inbox_depth",
    "nudge",
    "purge_waits",
    "signal",
]


async def due_now(conn: Conn, names: Sequence[str], *, now: float, new: bool = False) -> None:
    """Make released agents due at ``now`` (never later than they already are) and
    nudge the daemons. With ``new`` only agents not in the index yet are added
    (freshly applied ones: their first activation runs their start task)."""
    if not names:
        return
    k = conn.keys
    async with conn.r.pipeline(transaction=False) as pipe:
        for name in names:
            if new:
                pipe.zadd(k.due(k.due_shard(name)), {name: now}, nx=True)
            else:
                pipe.zadd(k.due(k.due_shard(name)), {name: now}, lt=True)
        pipe.xadd(
            k.signals(k.signal_shard(names[0])),
            {"cmd": "due", "agent": names[0]},
            maxlen=SIGNALS_MAXLEN,
            approximate=True,
        )
        await pipe.execute()


async def signal(conn: Conn, cmd: str, agent: str, **fields: str) -> None:
    """Nudge the daemons: ``cmd`` is wake, hibernate, message, applied or deleted."""
    await conn.r.xadd(
        conn.keys.signals(conn.keys.signal_shard(agent)),
        {"cmd": cmd, "agent": agent, **fields},
        maxlen=SIGNALS_MAXLEN,
        approximate=True,
    )


async def nudge(conn: Conn, signals: str, name: str) -> None:
    """A ``message`` signal for ``name`` on the shard ``signals``, through the batcher."""
    await conn.batch.command(
        "XADD", signals, "MAXLEN", "~", SIGNALS_MAXLEN, "*", "cmd", "message", "agent", name
    )


async def after_enqueue(conn: Conn, name: str, *, held: bool) -> None:
    """After a message was put in ``name``'s inbox (a send, a re-drive): make the agent
    due when no daemon holds it, else nudge its holder (on a cluster; on one server the
    script sent the signal itself)."""
    if not held:
        # No daemon holds the agent: it is due now, and whoever has room activates it
        # (the message waits in the inbox meanwhile). A repeat too: the first attempt
        # may have died before this step.
        await due_now(conn, [name], now=time.time())
    elif conn.cluster:
        # The message first, then the signal: a daemon nudged by the signal finds
        # the message; if the sender dies in between, the inbox sweep finds it.
        await nudge(conn, conn.keys.signals(conn.keys.signal_shard(name)), name)


async def feed_copy(conn: Conn, name: str, event_json: str) -> None:
    """Copy one of ``name``'s events to its shard of the fleet feed (a step of its own
    on a cluster: at most one copy is missing if the daemon dies in between; the
    agent's own stream has every event)."""
    k: Keys = conn.keys
    await conn.batch.command(
        "XADD",
        k.fleet_events(k.feed_shard(name)),
        "MAXLEN",
        "~",
        FLEET_EVENTS_MAXLEN,
        "*",
        "agent",
        name,
        "event",
        event_json,
    )


async def inbox_depth(conn: Conn, name: str) -> int:
    """Messages not yet acknowledged: the inbox's length (every ack deletes its entry)."""
    return int(await conn.r.xlen(conn.keys.inbox(name)))


async def purge_waits(conn: Conn, name: str) -> None:
    """Forget a deleted agent's wait, buffered events and due entry."""
    k = conn.keys
    async with conn.r.pipeline(transaction=False) as pipe:
        pipe.delete(k.wait(name), k.wait_events(name))
        pipe.zrem(k.due(k.due_shard(name)), name)
        await pipe.execute()
