"""The untyped edge of the store: redis-py's client and replies, named.

redis-py's asyncio stubs type replies as unions of everything (and the cluster client as
another class than the plain one): the store is the typed boundary, so the client and
the raw replies stay untyped under these names, and every repository turns what it reads
into plain Python values (:mod:`agentos.store.records`) at once. Nothing outside the
store sees either.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["RawArg", "RawClient", "RawReply"]

RawClient: TypeAlias = Any
"""A redis-py asyncio (or, in the lease keeper, sync) client or pipeline, plain or cluster."""

RawReply: TypeAlias = Any
"""A reply as redis-py returns it: nested lists, dicts and bytes."""

RawArg: TypeAlias = Any
"""One argument of a command or script: str, bytes, int or float, as redis-py encodes it
(left open: callers build mixed argument lists)."""
