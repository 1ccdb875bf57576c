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
from typing import Any, ParamSpec, TypeVar

from redis import exceptions as rexc

__all__ = ["SendRefused", "StoreError", "StoreFull", "StoreUnavailable", "reason", "translate"]

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


def classify(e: BaseException, store: Any) -> StoreError | None:
    """The store error for redis-py's ``e`` (None: not a Redis error), naming the
    store's URL without its password; a failed node also refreshes a cluster's slot map."""
    where = store.display_url
    if isinstance(e, _UNREACHABLE):
        _refresh(store)
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
        store = args[0]
        if getattr(store, "_topology_stale", False):
            await store._refresh_topology()  # type: ignore[attr-defined]
        try:
            return await fn(*args, **kwargs)
        except (rexc.RedisError, rexc.RedisClusterException, OSError) as e:
            error = classify(e, args[0])
            if error is None:
                raise
            raise error from e

    return inner


def _refresh(store: Any) -> None:
    """After a failure to reach a node, have a cluster store re-read the slot map before
    its next call (see ``Store._refresh_topology``): a failed-over master's slots are
    served by its replica now, and a dead node never answers with a redirect."""
    if getattr(store, "cluster", False):
        store._topology_stale = True


def reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    # redis-py repeats the address it tried; keep the first clause only.
    return text.splitlines()[0][:200]
