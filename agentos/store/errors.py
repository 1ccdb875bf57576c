"""The errors store callers see, and the decorator that turns redis-py's into them.

Callers tell three cases apart: Redis cannot be reached (:class:`StoreUnavailable`),
Redis is full and refuses writes (:class:`StoreFull`), and anything else
(:class:`StoreError`). The first two are transient: the operation can succeed later
unchanged (see :mod:`agentos.store.retry`).

Kept apart from ``agentos.store`` so that every store module (specs, snapshots, quotas)
translates errors the same way without importing the package that imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, Protocol, TypeVar, cast

from redis import exceptions as rexc

__all__ = [
    "INBOX_FULL_RETRY_AFTER_S",
    "InboxFull",
    "SendConflict",
    "SendRefused",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "reason",
    "translate",
]

# What a refused sender is told to wait: an inbox drains at its agent's pace, which
# nobody knows in advance; long enough not to hammer, short enough to catch up.
INBOX_FULL_RETRY_AFTER_S = 30.0

P = ParamSpec("P")
T = TypeVar("T")


class StoreError(Exception):
    """Redis answered with an error agentos did not expect."""


class StoreUnavailable(StoreError):
    """Redis could not be reached; the message names the URL without its password."""


class StoreFull(StoreError):
    """Redis refused a write because it reached ``maxmemory`` (an OOM reply).

    Nothing of the refused command was applied; reads still work. The message names
    the URL without its password.
    """


class SendRefused(Exception):
    """A checked send was refused, nothing enqueued: the agent is not applied
    (``limit`` None) or the message is larger than its inbox's ``limit`` bytes."""

    def __init__(self, name: str, limit: int | None) -> None:
        self.name = name
        self.limit = limit
        what = "is not applied" if limit is None else f"accepts messages up to {limit} bytes"
        super().__init__(f'agent "{name}" {what}')


class InboxFull(Exception):
    """A checked send was refused, nothing enqueued: the agent's inbox holds ``depth``
    messages not yet done, its ``maxDepth`` is ``limit``; try again after
    ``retry_after_s`` seconds."""

    def __init__(
        self, name: str, depth: int, limit: int, retry_after_s: float = INBOX_FULL_RETRY_AFTER_S
    ) -> None:
        self.name, self.depth, self.limit, self.retry_after_s = name, depth, limit, retry_after_s
        super().__init__(
            f'the inbox of agent "{name}" is full: {depth} messages waiting, maxDepth '
            f"{limit}; try again in {retry_after_s:g}s"
        )


class SendConflict(Exception):
    """A send id (an ``Idempotency-Key``) was reused with another body, nothing
    enqueued: ``message_id`` is the message the first send produced."""

    def __init__(self, name: str, message_id: str) -> None:
        self.name, self.message_id = name, message_id
        super().__init__(
            f'this send id already sent another message to agent "{name}" '
            f"(message {message_id}, task m-{message_id})"
        )


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, rexc.OutOfMemoryError) or "OOM command not allowed" in str(e)


# A cluster that is failing over or resharding answers these for a few seconds; the
# operation can succeed unchanged once the slot map settles (nothing of it ran).
_CLUSTER_TRANSIENT = (
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.AskError,  # MOVED too: a redirect the client could not follow yet
    rexc.SlotNotCoveredError,
)


_UNREACHABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    *_CLUSTER_TRANSIENT,
    OSError,
)


class Endpoint(Protocol):
    """What errors need of :class:`agentos.store.conn.Conn` (a protocol: conn imports this)."""

    display_url: str
    cluster: bool
    topology_stale: bool

    async def refresh_topology(self) -> None: ...


def endpoint(holder: object) -> Endpoint:
    """The connection behind a store method's ``self``: a repository's or the store's
    ``conn``, or the connection itself."""
    return cast(Endpoint, getattr(holder, "conn", holder))


def classify(e: BaseException, store: object) -> StoreError | None:
    """The store error for redis-py's ``e`` (None: not a Redis error), naming the
    store's URL without its password; a failed node also refreshes a cluster's slot map."""
    conn = endpoint(store)
    where = conn.display_url
    if isinstance(e, _UNREACHABLE):
        _refresh(conn)
        return StoreUnavailable(f"cannot reach Redis at {where}: {reason(e)}")
    if isinstance(e, rexc.RedisClusterException):  # not a RedisError
        if "cannot be connected" in str(e) or "not covered" in str(e).lower():
            return StoreUnavailable(f"cannot reach Redis at {where}: {reason(e)}")
        return StoreError(f"Redis Cluster error: {e}")
    if isinstance(e, rexc.RedisError):
        if _is_oom(e):
            return StoreFull(
                f"Redis at {where} is full: it refuses writes (used memory > "
                "maxmemory); free memory or raise maxmemory"
            )
        return StoreError(f"Redis error: {e}")
    return None


def translate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Store methods raise :class:`StoreError` and its kinds, never redis-py's errors."""

    @functools.wraps(fn)
    async def inner(*args: P.args, **kwargs: P.kwargs) -> T:
        conn = endpoint(args[0])
        if conn.topology_stale:
            await conn.refresh_topology()
        try:
            return await fn(*args, **kwargs)
        except (rexc.RedisError, rexc.RedisClusterException, OSError) as e:
            error = classify(e, args[0])
            if error is None:
                raise
            raise error from e

    return inner


def _refresh(conn: Endpoint) -> None:
    """After a failure to reach a node, have a cluster store re-read the slot map before
    its next call (see ``Conn.refresh_topology``): a failed-over master's slots are
    served by its replica now, and a dead node never answers with a redirect."""
    if conn.cluster:
        conn.topology_stale = True


def reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    # redis-py repeats the address it tried; keep the first clause only.
    return text.splitlines()[0][:200]
