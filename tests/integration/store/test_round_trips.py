"""The round trips a message costs, counted on a real server with MONITOR.

Times are for benchmarks (bench/dispatch.py); counts are pinned here. Each test watches
the server's command feed while messages go from ``Client.send`` to a succeeded task
and counts the commands clients sent (not those scripts ran): the send script, the
daemon's fenced writes and inbox reads, and reads that a write or a batch read should
have served (idempotency lookups, spec reads).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest

from agentos.client import Client
from agentos.store import Store
from tests.fixture_agents import HOLD
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = pytest.mark.anyio

HOLDER = "tests.fixture_agents:Holder"
QUIET = {"status_flush_s": 60.0, "metering_flush_s": 60.0}  # no flush in the window


@asynccontextmanager
async def watching(store: Store) -> AsyncIterator[Counter[str]]:
    """Count the commands clients send while the block runs, by kind."""
    if store.cluster:  # AGENTOS_TEST_REDIS_URL names a cluster: no one MONITOR sees all
        pytest.skip("MONITOR counts the commands of one server, not of a cluster")
    counts: Counter[str] = Counter()
    shas = {
        store.conn.scripts.fenced.sha: "fenced-write",
        store.conn.scripts.inbox_send.sha: "send",
        store.conn.scripts.inbox_read.sha: "inbox-read",
    }
    ready = anyio.Event()
    # Marks this test sends through the server: seen in the feed, every command the
    # server ran before them is in it too (the server runs one command at a time).
    marks = {f"watching-{which}-{id(counts)}": anyio.Event() for which in ("on", "off")}
    on, off = marks

    async def listen() -> None:
        async with store.conn.r.monitor() as monitor:
            ready.set()
            async for entry in monitor.listen():
                if entry.get("client_type") == "lua":
                    continue  # run by a script, not a round trip
                words = entry["command"].split()
                name = words[0].upper()
                if name == "ECHO":
                    for mark, seen in marks.items():
                        if mark in entry["command"]:
                            seen.set()
                    continue
                if name == "EVALSHA":
                    name = shas.get(words[1], "other-script")
                elif name == "HGET" and words[1].endswith(":specs"):
                    name = "spec-read"
                counts[name] += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen)
        await ready.wait()
        with anyio.fail_after(10):
            await store.conn.r.echo(on)
            await marks[on].wait()  # MONITOR is on before the block's first command
        yield counts
        with anyio.fail_after(10):
            await store.conn.r.echo(off)
            await marks[off].wait()  # the last replies' commands are in the feed
        tg.cancel_scope.cancel()


async def test_a_message_to_an_awake_agent_costs_a_send_a_read_and_two_writes(
    store: Store,
) -> None:
    await apply(store, agent_doc("echo", HOLDER, triggers=[{"inbox": {}}]))
    client = Client(store)
    async with running_daemon(store, **QUIET):
        # Every script loaded on the server: the first message may be read at the agent's
        # start, the second through the runner's own inbox read.
        for n, warm_up in enumerate(["warm-up", "warm-up 2"], start=1):
            await client.send("echo", warm_up)
            await wait_until(
                partial(status_is, store, "echo", phase="Idle", tasks_succeeded=str(n))
            )
        async with watching(store) as counts:
            await client.send("echo", "one", key="k1")
            await wait_until(lambda: status_is(store, "echo", phase="Idle", tasks_succeeded="3"))
    assert counts["send"] == 1  # the agent and size checks are inside the send script
    assert counts["spec-read"] == 0
    assert counts["inbox-read"] == 1, dict(counts)  # XREADGROUP behind a lease check
    assert counts["XREADGROUP"] == 0
    # The task's start (with the key's check inside), then its step, ack and close.
    assert counts["fenced-write"] == 2
    assert counts["ZSCORE"] == 0


@pytest.mark.parametrize("messages", [5])
async def test_a_batch_of_messages_costs_one_read_and_one_write_each_plus_two(
    store: Store, messages: int
) -> None:
    await apply(store, agent_doc("echo", HOLDER, triggers=[{"inbox": {}}]))
    client = Client(store)
    HOLD.pop("echo", None)
    async with running_daemon(store, **QUIET):
        await wait_until(lambda: status_is(store, "echo", phase="Idle"))
        await client.send("echo", "hold")
        await wait_until(lambda: status_is(store, "echo", phase="Running"))
        async with anyio.create_task_group() as tg:  # one tick: one pipeline
            for i in range(messages):
                tg.start_soon(client.send, "echo", f"m{i}")

        async def queued() -> bool:
            return await store.inbox.depth("echo") == messages + 1

        await wait_until(queued)
        async with watching(store) as counts:
            HOLD.setdefault("echo", anyio.Event()).set()
            await wait_until(
                lambda: status_is(store, "echo", phase="Idle", tasks_succeeded=str(messages + 1))
            )
    assert counts["inbox-read"] == 1
    # The held task's close; the batch's queued records in one write; each task's start
    # (carrying the previous task's step and close); the last task's close.
    assert counts["fenced-write"] == 1 + 1 + messages + 1
    assert counts["ZSCORE"] == 0
