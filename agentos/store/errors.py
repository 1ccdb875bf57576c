"""The two errors store callers see, and the decorator that turns redis-py's into them.

Kept apart from ``agentos.store`` so that every store module (specs, snapshots, quotas)
translates errors the same way without importing the package that imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from redis import exceptions as rexc

__all__ = ["StoreError", "StoreUnavailable", "reason", "translate"]

P = ParamSpec("P")
T = TypeVar("T")


class StoreError(Exception):
    """Redis answered with an error agentos did not expect."""


class StoreUnavailable(StoreError):
    """Redis could not be reached; the message names the URL without its password."""


def _translate(
    url_for_errors: Callable[[Any], str],
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def inner(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await fn(*args, **kwargs)
            except (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError) as e:
                where = url_for_errors(args[0])
                raise StoreUnavailable(f"cannot reach Redis at {where}: {reason(e)}") from e
            except rexc.RedisError as e:
                raise StoreError(f"Redis error: {e}") from e

        return inner

    return wrap


def reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    # redis-py repeats the address it tried; keep the first clause only.
    return text.splitlines()[0][:200]


translate = _translate(lambda store: store.display_url)
