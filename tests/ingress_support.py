"""An in-process ingress and a parked question, shared by the ingress tests."""

from __future__ import annotations

import time
from typing import Any

import httpx

from agentos.client import Client
from agentos.core.waits import WaitKind, WaitRecord
from agentos.ingress import build_app
from agentos.store import Store

ECHO = "tests.fixture_agents:Echo"
JSON = {"Content-Type": "application/json"}


def http(
    store: Store,
    *,
    token: str | None = None,
    base_url: str = "http://127.0.0.1:8080",
    **options: Any,
) -> httpx.AsyncClient:
    """A client of an in-process ingress app (no socket), as if on 127.0.0.1:8080."""
    app = build_app(
        Client(store), token=token, ready=lambda: True, bind=("127.0.0.1", 8080), **options
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


async def park(store: Store, agent: str, task: str = "m-1-0") -> WaitRecord:
    """A parked yes/no question of ``agent``, as a runner leaves it."""
    record = WaitRecord(
        agent, task, "p1", WaitKind.ASK, "deploy?", ("yes", "no"), None, None, False,
        time.time(), 0,
    )  # fmt: skip
    await store.waits.put(record, provisional_at=time.time() + 3600)
    return record
