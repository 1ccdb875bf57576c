"""The one retry policy of agentos: wait out a Redis that is away or full, then try again.

redis-py can retry on its own, but it re-sends whatever it was sending: a script, an
XADD or a MULTI/EXEC whose reply was lost after the server applied it would be applied
twice. agentos therefore turns client retries off (see :meth:`Store.connect`) and
retries here, where the caller says what is being retried and can only pass operations
that are safe to repeat: reads, and writes that carry an operation id (a fenced write
with ``op_id``, a send with ``send_id``, a status batch with its op ids), which the
server applies at most once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from agentos.store.errors import StoreError, StoreFull, StoreUnavailable

__all__ = ["TRANSIENT", "new_op_id", "retry"]

log = logging.getLogger("agentos.store")

T = TypeVar("T")

TRANSIENT: tuple[type[StoreError], ...] = (StoreUnavailable, StoreFull)
"""Errors after which the same operation may succeed unchanged: Redis away, or full."""

FIRST_DELAY_S = 0.1


def new_op_id() -> str:
    """A fresh operation id (16 hex characters) for a write that may be retried."""
    return uuid.uuid4().hex[:16]


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    max_delay_s: float = 5.0,
    on_retry: Callable[[StoreError, float], object] | None = None,
    attempts: int | None = None,
) -> T:
    """Call ``op()`` until it returns, and return what it returned.

    On a :data:`TRANSIENT` error waits (0.1 s, doubling, at most ``max_delay_s``), logs
    one warning naming ``what`` and calls ``on_retry(error, delay)`` before the wait.
    Gives up after ``attempts`` calls (None: never) by re-raising the last error; any
    other exception propagates at once.

    Only for operations that are safe to repeat: reads, and writes that carry an
    operation id. A lost reply does not mean the write was not applied.
    """
    delay = min(FIRST_DELAY_S, max_delay_s)
    tried = 0
    while True:
        try:
            return await op()
        except TRANSIENT as e:
            tried += 1
            if attempts is not None and tried >= attempts:
                raise
            # Store errors name the URL with its password redacted (display_url).
            log.warning("%s: %s; retrying in %.1fs", what, e, delay)
            if on_retry is not None:
                on_retry(e, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
