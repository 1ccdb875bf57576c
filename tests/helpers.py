"""Test helpers: build specs, run an in-process daemon, wait for a condition."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from agentos.client import Client
from agentos.core.spec import Document, parse_text
from agentos.daemon import Daemon
from agentos.engine import Engine, SimEngine
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreUnavailable
from agentos.telemetry import Telemetry

FAST = {"lease_ttl_s": 2.0, "grace_s": 1.0, "reconcile_interval_s": 0.05, "status_flush_s": 0.1}


def agent_doc(name: str, entrypoint: str, **spec: Any) -> Document:
    """One Agent document, written as YAML (JSON is YAML) and loaded like a file."""
    body = {
        "apiVersion": "agentos/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {"entrypoint": entrypoint, **spec},
    }
    (doc,) = parse_text(json.dumps(body), source=f"<{name}>")
    return doc


def policy_doc(body: dict[str, Any]) -> Document:
    """One QuotaPolicy (or any) resource given as a dict, loaded like a file."""
    (doc,) = parse_text(json.dumps(body), source=f"<{body['metadata']['name']}>")
    return doc


async def state_of(store: Store, name: str, type_: type) -> object | None:
    """An agent's durable state decoded as ``type_`` (None before its first save)."""
    raw = await store.load_state(name)
    return None if raw is None else msgspec.json.decode(raw, type=type_)


async def apply(store: Store, *docs: Document) -> None:
    await Client(store).apply(list(docs))


@asynccontextmanager
async def running_daemon(
    store: Store,
    engine: Engine | None = None,
    *,
    telemetry: Telemetry | None = None,
    **settings: Any,
) -> AsyncIterator[Daemon]:
    """A daemon running in the background of the test; stopped gracefully on exit."""
    d = Daemon(
        store, engine or SimEngine(), DaemonSettings(**{**FAST, **settings}), telemetry=telemetry
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        try:
            yield d
        finally:
            d.request_stop()


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, within: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``.

    A check that cannot reach Redis (the test's own pooled connection to a server that
    restarted fails once; the client does not resend) counts as "not yet".
    """
    last: Any = None
    with anyio.move_on_after(within):
        while True:
            try:
                last = await check()
            except StoreUnavailable as e:
                last = e
            else:
                if last:
                    return last
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last value {last!r}")


async def finished(store: Store, agent: str, task: str) -> dict[str, str]:
    """Task ``task`` of ``agent`` once it has succeeded or failed (its record)."""

    async def done() -> dict[str, str] | None:
        record = await store.task(agent, task)
        return record if record.get("status") in ("succeeded", "failed") else None

    record: dict[str, str] = await wait_until(done, within=40, what=f"task {task} to end")
    return record


async def waiting(store: Store, agent: str, task: str) -> None:
    """Until task ``task`` of ``agent`` is parked on a wait."""

    async def parked() -> bool:
        return (await store.task(agent, task)).get("status") == "waiting"

    await wait_until(parked, within=40, what=f"task {task} to wait")


class _Mismatch(dict[str, str]):
    """A status that did not match; falsy, but shows itself in timeout messages."""

    def __bool__(self) -> bool:
        return False


async def status_is(store: Store, name: str, **expected: str) -> dict[str, str] | None:
    st = await store.status(name)
    return st if all(st.get(k) == v for k, v in expected.items()) else _Mismatch(st)
