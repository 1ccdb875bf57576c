"""Placeholder for the store's one retry policy (replaced by the store branch)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from agentos.store.errors import StoreError, StoreUnavailable

__all__ = ["TRANSIENT", "new_op_id", "retry"]

T = TypeVar("T")
TRANSIENT: tuple[type[StoreError], ...] = (StoreUnavailable,)
log = logging.getLogger("agentos.store")


def new_op_id() -> str:
    return uuid.uuid4().hex[:16]


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    max_delay_s: float = 5.0,
    on_retry: Callable[[StoreError, float], object] | None = None,
    attempts: int | None = None,
) -> T:
    delay = 0.1
    tried = 0
    while True:
        try:
            return await op()
        except TRANSIENT as e:
            tried += 1
            if attempts is not None and tried >= attempts:
                raise
            log.warning("%s: %s; retrying in %.1fs", what, e, delay)
            if on_retry is not None:
                on_retry(e, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
