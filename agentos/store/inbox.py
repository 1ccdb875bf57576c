"""Agent inboxes: sending, reading and taking over an agent's messages.

Messages wait in one stream per agent, read through a consumer group so that a new owner
can take over what a dead daemon had read but not finished (``claim_inbox``, and
:mod:`~agentos.store.takeover`). Sends can be made at most once with a send id
(``lua/inbox_send.lua``), and a checked send is refused when the agent is not applied,
the message is too large or the inbox holds ``maxDepth`` messages already: a stuck
agent's inbox is bounded. A message nobody can process leaves the inbox through
:mod:`~agentos.store.poison`; the task records fenced writes leave behind are in
:mod:`~agentos.store.tasks`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from redis import exceptions as rexc

from agentos.core.spec import INBOX_MAX_DEPTH
from agentos.store import steps
from agentos.store.conn import Conn
from agentos.store.errors import (
    INBOX_FULL_RETRY_AFTER_S,
    InboxFull,
    SendConflict,
    SendRefused,
    translate,
)
from agentos.store.keys import INBOX_GROUP
from agentos.store.records import SIGNALS_MAXLEN, InboxMessage, _s, messages_of, pairs_of

__all__ = [
    "DEAD_LETTERS_KEPT",
    "INBOX_FULL_RETRY_AFTER_S",
    "OPEN_NEW_MESSAGES",
    "SEND_DEDUPE_TTL_S",
    "Inbox",
    "InboxFull",
    "SendConflict",
]

SEND_DEDUPE_TTL_S = 3600  # a send retried later than this is a new message
OPEN_NEW_MESSAGES = 100  # new messages a new owner reads with the rest
DEAD_LETTERS_KEPT = 1000  # per agent; past it the oldest dead letter is forgotten


class Inbox:
    """Sending to and reading from agent inboxes (``store.inbox``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self.cluster = conn.cluster
        self._batch = conn.batch
        self._send_once = conn.scripts.inbox_send
        self._read_fenced = conn.scripts.inbox_read

    @translate
    async def send(
        self,
        name: str,
        body: str,
        *,
        key: str | None = None,
        traceparent: str | None = None,
        send_id: str | None = None,
        check_limit: int | None = None,
        digest: str | None = None,
    ) -> str:
        """Put a message in the agent's inbox and nudge the daemons. Returns the message id.

        With ``send_id`` the send is applied at most once (for an hour): sending
        again with the same id (a retry after a lost reply) adds nothing and returns the
        first message's id; with a ``digest`` of the body too, sending again with the
        same id and another digest raises :class:`SendConflict`. With ``check_limit``,
        the send checks in the same step that the agent is applied and the message fits
        its inbox (``check_limit`` is the size limit when the agent's index entry names
        none) and raises :class:`SendRefused` otherwise, and that the inbox holds fewer
        than its ``maxDepth`` messages (:class:`InboxFull` otherwise). Every send on an
        agent's behalf (``agentos send``, HTTP, ``ctx.send``) should check: an unchecked
        send creates the inbox of a name nobody applied.
        """
        fields = {"body": body, "sent_at": repr(time.time())}
        if key:
            fields["key"] = key
        if traceparent:
            fields["traceparent"] = traceparent
        k = self.keys
        signals = k.signals(k.signal_shard(name))
        check = "" if check_limit is None else str(check_limit)
        ttl = "" if send_id is None else SEND_DEDUPE_TTL_S
        args: list[str | int] = [
            ttl,
            name,
            SIGNALS_MAXLEN,
            check,
            len(body.encode()),
            digest or "",
            INBOX_MAX_DEPTH,
        ]
        for f, v in fields.items():
            args += [f, v]
        keys = [k.sent(name, send_id or "-"), k.inbox(name), k.applied(name), k.lease(name)]
        if not self.cluster:
            keys.append(signals)
        verdict, value, *rest = await self._batch.run(self._send_once, keys, args)
        match _s(verdict):
            case "ok":
                pass
            case "full":
                raise InboxFull(name, int(value), int(rest[0]))
            case "conflict":
                raise SendConflict(name, _s(value))
            case "missing":
                raise SendRefused(name, None)
            case _:
                raise SendRefused(name, int(value))
        await steps.after_enqueue(self.conn, name, held=bool(int(rest[0])))
        return _s(value)

    @translate
    async def ensure(self, name: str) -> None:
        """Create the inbox stream and its consumer group if missing."""
        try:
            await self._r.xgroup_create(self.keys.inbox(name), INBOX_GROUP, id="0", mkstream=True)
        except rexc.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    @translate
    async def claim(self, name: str, consumer: str) -> int:
        """Take over every pending message of the inbox (its earlier reader is gone).

        Only the lease holder calls this, so every pending entry belongs to a dead or
        superseded reader. Returns how many were claimed.
        """
        claimed = 0
        start = "0-0"
        while True:
            # justid=True would be lighter, but redis-py then drops the cursor.
            reply = await self._r.xautoclaim(
                self.keys.inbox(name),
                INBOX_GROUP,
                consumer,
                min_idle_time=0,
                start_id=start,
                count=100,
            )
            start = _s(reply[0])
            claimed += len(reply[1])
            if start == "0-0":
                return claimed

    @translate
    async def read(
        self,
        name: str,
        consumer: str,
        *,
        count: int = 1,
        pending: bool = False,
        lease: str | None = None,
    ) -> list[InboxMessage]:
        """Next messages for ``consumer``: its own unacknowledged ones if ``pending``, else new.

        With ``lease`` ("daemon|token") only while it is still the agent's lease (none
        otherwise): a daemon that was superseded takes no message the new owner misses.
        """
        start = "0" if pending else ">"
        if lease is None:
            reply = await self._r.xreadgroup(
                INBOX_GROUP, consumer, {self.keys.inbox(name): start}, count=count
            )
            return messages_of(reply)
        k = self.keys
        held, *rest = await self._batch.run(
            self._read_fenced,
            [k.lease(name), k.inbox(name)],
            [lease, INBOX_GROUP, consumer, count, start],
        )
        if not int(held) or not rest or not rest[0]:
            return []
        return messages_of(
            [(stream, [(i, pairs_of(flat)) for i, flat in entries]) for stream, entries in rest[0]]
        )

    @translate
    async def lengths(self, names: Sequence[str]) -> dict[str, int]:
        """Entries in each agent's inbox (unacknowledged messages: acks delete them), in
        one pipeline per 1,000 agents."""
        out: dict[str, int] = {}
        for i in range(0, len(names), 1000):
            chunk = names[i : i + 1000]
            async with self._r.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.xlen(self.keys.inbox(name))
                out |= dict(zip(chunk, map(int, await pipe.execute()), strict=True))
        return out

    @translate
    async def depth(self, name: str) -> int:
        """Messages not yet acknowledged (pending + not yet delivered): the inbox's
        length, since every ack deletes its entry (and so does a drop or a move to the
        dead letters). The same count a checked send compares with ``maxDepth``; the
        consumer group's ``lag`` is not used, as Redis leaves it stale once an entry
        that was never delivered is deleted."""
        return int(await self._r.xlen(self.keys.inbox(name)))

    @translate
    async def has(self, name: str, message_id: str) -> bool:
        """Whether message ``message_id`` is still in the agent's inbox (not yet done)."""
        try:
            found = await self._r.xrange(self.keys.inbox(name), message_id, message_id, count=1)
        except rexc.ResponseError:  # not a stream id: no such message
            return False
        return bool(found)
