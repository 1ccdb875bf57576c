"""What the client asks of agents: messages, poison messages and the daemon's signals.

`agentos send`, `drop`, `retry`, `hibernate`, `wake` and `restart` (and their HTTP
endpoints) are built on these functions (through :class:`agentos.client.Client`). A
send is one script that checks the agent, the size and the depth at once; the others
write what the agent's daemon acts on and signal it, so they work whether or not a
daemon holds the agent now.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from agentos.client.errors import InboxFull, SendConflict
from agentos.client.reports import require_agent
from agentos.core.errors import DEFAULT_MAX_MESSAGE_BYTES, MessageTooLarge, NotFound
from agentos.store import DeadLetter, SendRefused, Store
from agentos.store import InboxFull as _StoreInboxFull
from agentos.store import SendConflict as _StoreSendConflict
from agentos.store.retry import new_op_id, retry

__all__ = [
    "body_digest",
    "dead_letters",
    "drop",
    "hibernate",
    "read_message_arg",
    "restart",
    "restarted",
    "retry_dead",
    "send",
    "wake",
]


async def send(
    name: str,
    body: str,
    *,
    store: Store,
    key: str | None,
    traceparent: str | None,
    send_id: str | None,
) -> str:
    """Put a message in an agent's inbox. Returns the message id.

    With ``send_id`` (an HTTP ``Idempotency-Key``'s, say) the send is made at most
    once for an hour: the same id again returns the first message's id, and raises
    :class:`SendConflict` if it comes with another body. Raises :class:`NotFound`
    for an unknown agent, :class:`MessageTooLarge` for a message larger than its
    inbox takes, :class:`InboxFull` when its inbox holds ``maxDepth`` messages;
    nothing is enqueued then.
    """
    # One round trip: the script checks the agent, the size and the depth. A pooled
    # connection to a Redis that restarted fails once: a few quick retries reach a
    # fresh one, safe because the send carries an id.
    send_id = send_id or new_op_id()
    digest = body_digest(body)
    try:
        return await retry(
            lambda: store.inbox.send(
                name,
                body,
                key=key,
                traceparent=traceparent,
                send_id=send_id,
                check_limit=DEFAULT_MAX_MESSAGE_BYTES,
                digest=digest,
            ),
            what=f"send to {name}",
            max_delay_s=0.5,
            attempts=3,
        )
    except SendRefused as e:
        if e.limit is None:
            raise NotFound(f'agent "{name}" not found') from None
        raise MessageTooLarge(name, len(body.encode()), e.limit) from None
    except _StoreInboxFull as e:
        raise InboxFull(name, e.depth, e.limit, e.retry_after_s) from None
    except _StoreSendConflict as e:
        raise SendConflict(name, e.message_id) from None


def body_digest(body: str) -> str:
    """A message body's digest, kept with its send id: the same id with another body is
    a conflict (:class:`SendConflict`), not a replay."""
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def read_message_arg(value: str) -> str:
    """`agentos send` message text: ``@FILE`` reads a file, ``-`` standard input."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        return Path(value[1:]).read_text()
    return value


# ---------------------------------------------------------------------- poison messages


async def drop(name: str, task_id: str, *, store: Store, by: str) -> str:
    """Drop the message of task ``task_id`` for good: out of the inbox (queued or
    being retried) or out of the dead letters, the task recorded as ``dropped`` with
    a ``Dropped`` event naming ``by``. Returns where it was: "inbox" or "dead".

    Raises :class:`NotFound` for an unknown agent, or a task with no message left
    (not a message's task, already done, dropped or re-driven).
    """
    await require_agent(name, store=store)
    where = await store.poison.drop(name, task_id, by=by)
    if where is None:
        raise NotFound(
            f'task {task_id} of agent "{name}" has no message to drop (neither waiting '
            "in its inbox nor a dead letter)"
        )
    return where


async def retry_dead(name: str, task_id: str, *, store: Store, by: str) -> str:
    """Send the dead letter of task ``task_id`` again (back into the inbox, out of the
    dead letters). Returns the new message id (its task is ``m-<id>``).

    Raises :class:`NotFound` for an unknown agent or a task with no dead letter,
    :class:`InboxFull` when the agent's inbox is full.
    """
    await require_agent(name, store=store)
    try:
        message_id = await store.poison.redrive(name, task_id, by=by)
    except SendRefused:
        raise NotFound(f'agent "{name}" not found') from None
    except _StoreInboxFull as e:
        raise InboxFull(name, e.depth, e.limit, e.retry_after_s) from None
    if message_id is None:
        raise NotFound(f'task {task_id} of agent "{name}" is not a dead letter')
    return message_id


async def dead_letters(name: str, *, store: Store, count: int) -> list[DeadLetter]:
    """The agent's dead letters, newest first: messages whose task failed or was
    interrupted ``crashLoopAfter`` times in a row. Raises :class:`NotFound`."""
    await require_agent(name, store=store)
    return await store.poison.dead_letters(name, count=count)


# ---------------------------------------------------------------------- daemon signals


async def hibernate(name: str, *, store: Store) -> bool:
    """Ask the agent's daemon to hibernate (and release) it as soon as it is idle;
    False (nothing asked) when it is hibernated already or no daemon holds it."""
    await require_agent(name, store=store)
    if (await store.agents.status(name)).get("phase") == "Hibernated":
        return False
    if name not in await store.leases.read([name]):
        return False
    await store.signals.send("hibernate", name)
    return True


async def wake(name: str, *, store: Store) -> None:
    """Run a wake task (and retry the agent if it Failed); an agent no daemon holds is
    activated for it by whichever daemon has room."""
    await require_agent(name, store=store)
    if await store.waits.wake(name, now=time.time()):
        await store.signals.send("wake", name)


async def restart(name: str, *, store: Store, grace_s: float | None) -> str | None:
    """Ask the agent's daemon to restart it (``agentos restart``): once its task ends
    (or after ``grace_s``) it is stopped gracefully and started again with its code
    loaded anew, and a ``Restarted`` event is written. Returns a mark for
    :func:`restarted`, or None when no daemon holds the agent: there is nothing to
    restart (its next activation loads the applied code)."""
    await require_agent(name, store=store)
    if name not in await store.leases.read([name]):
        return None
    last = await store.events.read(name, count=1)
    grace = "" if grace_s is None else repr(grace_s)
    await store.signals.send("restart", name, grace=grace)
    return last[-1].id if last else "0-0"


async def restarted(name: str, mark: str, *, store: Store) -> bool:
    """Whether the agent's daemon restarted it since ``mark`` (a ``Restarted``
    event: by the restart, or by a respec or a release that came first)."""
    events = await store.events.read(name, count=1000, after_id=mark)
    return any(e.type == "Restarted" for e in events)
