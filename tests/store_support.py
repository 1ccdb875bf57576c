"""Leases and events written by hand, shared by the store tests (test_store_pressure*.py)."""

from __future__ import annotations

import time
from typing import Any

from agentos.store import Store


async def held_lease(store: Store, name: str, daemon: str = "d1") -> str:
    """Take ``name``'s lease for ``daemon``; its value ("daemon|token")."""
    token = await store.leases.acquire(name, daemon, 60_000)
    assert token
    return f"{daemon}|{token}"


def event_fields(message: str) -> dict[str, str]:
    """The fields of an event written by a test."""
    return {"time": repr(time.time()), "type": "Tested", "reason": "r", "message": message}


async def nonempty(items: list[Any]) -> bool:
    return bool(items)
