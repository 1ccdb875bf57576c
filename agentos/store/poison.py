"""Poison messages: dead letters, dropped and cancelled messages, and re-driving them.

A message nobody can process leaves the inbox in one atomic step each way: to the
agent's dead letters after too many failed starts (``dead_letter``, by the owner), out
of the fleet when an operator drops it (``drop_message``), back in when one re-drives
it (``redrive``). Each step records the task and writes an event in the same script.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Literal

from agentos.core.spec import INBOX_MAX_DEPTH
from agentos.store import inbox, steps
from agentos.store.conn import Conn
from agentos.store.errors import InboxFull, SendRefused, translate
from agentos.store.inbox import DEAD_LETTERS_KEPT as DEAD_LETTERS_KEPT
from agentos.store.keys import INBOX_GROUP, event_fields
from agentos.store.records import EVENTS_MAXLEN, FLEET_EVENTS_MAXLEN, SIGNALS_MAXLEN, _s

__all__ = ["DEAD_LETTERS_KEPT", "DeadLetter", "Poison"]
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


class DeadLetter(dict[str, str]):
    """One dead letter as stored: ``task``, ``message_id``, ``body``, ``key``,
    ``traceparent``, ``sent_at``, ``attempts``, ``error``, ``dead_at`` (all text)."""


class Poison:
    """Dead letters, drops, cancels and re-drives (``store.poison``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self.cluster = conn.cluster
        self._dead_script = conn.scripts.inbox_dead
        self._drop_script = conn.scripts.inbox_drop
        self._redrive_script = conn.scripts.inbox_redrive

    def _event_json(self, name: str, now: float, type_: str, message: str, daemon: str) -> str:
        return event_fields(name, now, type_, type_, message, daemon)["event"]

    def _tasks_ttl_s(self) -> int:
        return max(1, math.ceil(self.conn.retention.tasks_s))

    @translate
    async def dead_letter(
        self,
        name: str,
        lease_value: str,
        message_id: str,
        *,
        task_id: str,
        attempts: int,
        error: str,
        now: float | None = None,
        daemon: str = "",
    ) -> Literal["moved", "not-held", "gone"]:
        """Move a message whose task failed or was interrupted ``attempts`` times in a
        row from the inbox to the agent's dead letters, atomically, while
        ``lease_value`` ("daemon|token") is still the agent's lease: the message is
        acknowledged and deleted from the inbox, kept (body, key, trace, ``attempts``,
        ``error``) among the newest :data:`~agentos.store.inbox.DEAD_LETTERS_KEPT`, its
        task recorded as ``dead`` and a ``DeadLettered`` event written.

        Returns "moved", "not-held" (the lease is not the caller's: nothing done) or
        "gone" (the message is no longer in the inbox: nothing done; a retry after a
        lost reply sees this too). ``error`` should be scrubbed of secrets already.
        """
        now = time.time() if now is None else now
        k = self.keys
        event = self._event_json(
            name,
            now,
            "DeadLettered",
            f"task {task_id} did not finish after {attempts} attempts in a row; its message "
            f"is a dead letter now (agentos tasks {name} --dead): {error[:500]}",
            daemon,
        )
        keys = [
            k.lease(name),
            k.inbox(name),
            k.dead(name),
            k.dead_order(name),
            k.task(name, task_id),
            k.tasks(name),
            k.events(name),
        ]
        if not self.cluster:
            keys.append(k.fleet_events(k.feed_shard(name)))
        args: list[str | int] = [
            lease_value,
            message_id,
            task_id,
            INBOX_GROUP,
            attempts,
            error,
            repr(now),
            name,
            inbox.DEAD_LETTERS_KEPT,  # read at call time: an inbox bound (tests lower it)
            self._tasks_ttl_s(),
            event,
            EVENTS_MAXLEN,
            FLEET_EVENTS_MAXLEN,
        ]
        code = int(await self._dead_script(keys=keys, args=args))
        if code == 1 and self.cluster:
            await steps.feed_copy(self.conn, name, event)
        return "moved" if code == 1 else "not-held" if code == 0 else "gone"

    @translate
    async def drop(
        self,
        name: str,
        task_id: str,
        *,
        by: str,
        now: float | None = None,
        cancel: bool = False,
    ) -> Literal["inbox", "dead"] | None:
        """Drop the message of task ``task_id`` (``m-<message id>``): out of the inbox
        (acknowledged and deleted, read or not) or out of the dead letters, the task
        recorded as ``dropped`` and a ``Dropped`` event naming ``by`` written, in one
        atomic step; the agent's owner, if any, gets a ``drop`` signal (with ``task``).
        With ``cancel`` (``agentos tasks cancel``) the task is recorded ``cancelled`` with
        a ``TaskCancelled`` event, and the owner gets a ``cancel`` signal instead: a task
        already running that message is cut short there.

        Returns where the message was, or None when it is in neither (or the task is not
        a message's): nothing changed then.
        """
        message_id = task_id.removeprefix("m-")
        if not task_id.startswith("m-") or not _STREAM_ID.fullmatch(message_id):
            return None
        now = time.time() if now is None else now
        k = self.keys
        status = "cancelled" if cancel else "dropped"
        event = self._event_json(
            name,
            now,
            "TaskCancelled" if cancel else "Dropped",
            f"task {task_id} cancelled by {by}"
            if cancel
            else f"task {task_id} dropped by {by}: its message will not run",
            "",
        )
        keys = [
            k.inbox(name),
            k.dead(name),
            k.dead_order(name),
            k.task(name, task_id),
            k.tasks(name),
            k.events(name),
            k.lease(name),
        ]
        if not self.cluster:
            keys.append(k.fleet_events(k.feed_shard(name)))
        args: list[str | int] = [
            message_id,
            task_id,
            INBOX_GROUP,
            repr(now),
            name,
            f"{status} by {by}",
            self._tasks_ttl_s(),
            event,
            EVENTS_MAXLEN,
            FLEET_EVENTS_MAXLEN,
            status,
        ]
        reply = await self._drop_script(keys=keys, args=args)
        if not int(reply[0]):
            return None
        if self.cluster:
            await steps.feed_copy(self.conn, name, event)
        if int(reply[2]):
            # A cancel also cuts the task short if the owner runs it now.
            await steps.signal(
                self.conn, "cancel" if cancel else "drop", name, task=task_id, by=by, dropped="1"
            )
        return "inbox" if _s(reply[1]) == "inbox" else "dead"

    @translate
    async def redrive(
        self, name: str, task_id: str, *, by: str, now: float | None = None
    ) -> str | None:
        """Send the dead letter of task ``task_id`` again: a new message in the inbox
        (same body, key and trace), out of the dead letters, the old task record naming
        the new task (``redriven_as``), a ``Redriven`` event; one atomic step, then the
        agent is nudged as for a send. Returns the new message id, None when the task has
        no dead letter. Raises :class:`SendRefused` (limit None) when the agent is no
        longer applied, :class:`InboxFull` when its inbox is full.
        """
        now = time.time() if now is None else now
        k = self.keys
        # The script writes the new task's id in place of {task}.
        sent = f"the message of task {task_id} sent again by {by} as {{task}}"
        event = self._event_json(name, now, "Redriven", sent, "")
        keys = [
            k.dead(name),
            k.dead_order(name),
            k.inbox(name),
            k.applied(name),
            k.lease(name),
            k.task(name, task_id),
            k.events(name),
        ]
        if not self.cluster:
            keys += [k.signals(k.signal_shard(name)), k.fleet_events(k.feed_shard(name))]
        args: list[str | int] = [
            task_id,
            INBOX_MAX_DEPTH,
            repr(now),
            name,
            SIGNALS_MAXLEN,
            event,
            EVENTS_MAXLEN,
            FLEET_EVENTS_MAXLEN,
            self._tasks_ttl_s(),
        ]
        verdict, value, *rest = await self._redrive_script(keys=keys, args=args)
        match _s(verdict):
            case "missing":
                return None
            case "gone":
                raise SendRefused(name, None)
            case "full":
                raise InboxFull(name, int(value), int(rest[0]))
        if self.cluster:
            await steps.feed_copy(self.conn, name, _s(rest[1]))
        await steps.after_enqueue(self.conn, name, held=bool(int(rest[0])))
        return _s(value)

    @translate
    async def dead_letters(self, name: str, *, count: int = 100) -> list[DeadLetter]:
        """The agent's dead letters, newest first (at most ``count``)."""
        k = self.keys
        ids = [_s(t) for t in await self._r.zrevrange(k.dead_order(name), 0, count - 1)]
        if not ids:
            return []
        raw = await self._r.hmget(k.dead(name), ids)
        return [
            DeadLetter({str(f): str(v) for f, v in json.loads(r).items()})
            for r in raw
            if r is not None
        ]
