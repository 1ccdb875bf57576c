"""Test helpers: build specs, run an in-process daemon, wait for a condition.

Tests wait on conditions, never on time (STYLE 19): :func:`wait_until` is the one
place that polls, and :class:`ShiftedClock` lets a daemon see time pass (or stand
still) without a test sleeping through it.
"""

from __future__ import annotations

import inspect
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
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

MAX_POLL_S = 0.2  # a poll is no sleep: a test waits on a condition, not on time
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


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inbox_triggers(depth: int | None = None) -> list[dict[str, Any]]:
    """An agent's ``triggers``: its inbox, of ``maxDepth`` ``depth`` when given."""
    return [{"inbox": {} if depth is None else {"maxDepth": depth}}]


def model_body(name: str, **spec: Any) -> dict[str, Any]:
    """A Model resource named ``name`` with ``spec``, as a dict (see policy_doc)."""
    return {"apiVersion": "agentos/v1", "kind": "Model", "metadata": {"name": name}, "spec": spec}


async def state_of(store: Store, name: str, type_: type) -> object | None:
    """An agent's durable state decoded as ``type_`` (None before its first save)."""
    raw = await store.agents.load_state(name)
    return None if raw is None else msgspec.json.decode(raw, type=type_)


async def apply(store: Store, *docs: Document) -> None:
    await Client(store).apply(list(docs))


@asynccontextmanager
async def running_daemon(
    store: Store,
    engine: Engine | None = None,
    *,
    telemetry: Telemetry | None = None,
    clock: Callable[[], float] = time.time,
    **settings: Any,
) -> AsyncIterator[Daemon]:
    """A daemon running in the background of the test; stopped gracefully on exit."""
    d = Daemon(
        store,
        engine or SimEngine(),
        DaemonSettings(**{**FAST, **settings}),
        clock=clock,
        telemetry=telemetry,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        try:
            yield d
        finally:
            d.request_stop()


async def _poll(
    check: Callable[[], Any], *, within: float, every: float, until: bool
) -> tuple[bool, Any]:
    """Call ``check`` (sync or async) every ``every`` seconds for at most ``within``
    seconds; return ``(True, value)`` as soon as its truth is ``until``, else
    ``(False, last value)``. A check that cannot reach Redis (the test's own pooled
    connection to a server that restarted fails once; the client does not resend)
    counts as neither."""
    assert 0 < every <= MAX_POLL_S, f"poll every {every}s: at most {MAX_POLL_S}s"
    last: Any = None
    with anyio.move_on_after(within):
        while True:
            try:
                value = check()
                if inspect.isawaitable(value):
                    value = await value  # cut here by the deadline: ``last`` stays a value
            except StoreUnavailable as e:
                last = e
            else:
                last = value
                if bool(last) is until:
                    return True, last
            await anyio.sleep(every)  # the one polling interval of the test suite
    return False, last


async def wait_until(
    check: Callable[[], Any],
    *,
    within: float = 10.0,
    what: str = "condition",
    every: float = 0.02,
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; fail the test
    after ``within`` seconds."""
    met, last = await _poll(check, within=within, every=every, until=True)
    if not met:
        raise AssertionError(f"timed out after {within}s waiting for {what}; last value {last!r}")
    return last


async def held_within(check: Callable[[], Any], *, within: float, every: float = 0.02) -> bool:
    """Whether ``check`` returned something truthy within ``within`` seconds (no failure:
    for tests that look at what happens either way)."""
    met, _ = await _poll(check, within=within, every=every, until=True)
    return bool(met)


async def steady(
    check: Callable[[], Any], *, for_s: float, what: str = "condition", every: float = 0.1
) -> None:
    """Fail the test if ``check`` stops holding at any poll during the next ``for_s``
    seconds: for what a test asserts over real time ("nothing happens for a lease")."""
    broke, last = await _poll(check, within=for_s, every=every, until=False)
    if broke:
        raise AssertionError(f"{what} stopped holding within {for_s}s; value {last!r}")


class ShiftedClock:
    """A daemon's clock: wall time moved by ``offset_s``, or held at one instant.

    ``advance`` makes seconds pass for the daemon at once (fires missed while no daemon
    ran); ``hold`` stops it at an exact instant, so what a daemon decides at its start
    (how many fires passed) is exact; ``resume`` lets it run on from there.
    """

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s
        self._held: float | None = None

    def __call__(self) -> float:
        return self._held if self._held is not None else time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        if self._held is not None:
            self._held += seconds
        self.offset_s += seconds

    def hold(self, at: float) -> None:
        self._held = at

    def resume(self) -> None:
        if self._held is not None:
            self.offset_s = self._held - time.time()
            self._held = None


async def finished(store: Store, agent: str, task: str) -> dict[str, str]:
    """Task ``task`` of ``agent`` once it has succeeded or failed (its record)."""

    async def done() -> dict[str, str] | None:
        record = await store.tasks.get(agent, task)
        return record if record.get("status") in ("succeeded", "failed") else None

    record: dict[str, str] = await wait_until(done, within=40, what=f"task {task} to end")
    return record


async def waiting(store: Store, agent: str, task: str) -> None:
    """Until task ``task`` of ``agent`` is parked on a wait."""

    async def parked() -> bool:
        return (await store.tasks.get(agent, task)).get("status") == "waiting"

    await wait_until(parked, within=40, what=f"task {task} to wait")


class _Mismatch(dict[str, str]):
    """A status that did not match; falsy, but shows itself in timeout messages."""

    def __bool__(self) -> bool:
        return False


async def status_is(store: Store, name: str, **expected: str) -> dict[str, str] | None:
    st = await store.agents.status(name)
    return st if all(st.get(k) == v for k, v in expected.items()) else _Mismatch(st)
