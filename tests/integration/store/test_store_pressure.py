"""The store under pressure, against real servers: lost replies and a bounded Redis (a full
Redis and stale owners: test_store_pressure_owners.py).

A cut connection after the server applied a write (tests/proxy.py) must not turn into a
double write when retried with the same op id; the client itself never retries; what
agents leave behind is deleted or expires; a Redis at maxmemory never ends the daemon;
and a stale owner's writes change nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from agentos.client import Client
from agentos.engine.base import KVSnapshot
from agentos.runtime import kvsnapshots
from agentos.store import (
    Store,
    StoreError,
    StoreFull,
    StoreUnavailable,
    TaskWrite,
    Write,
)
from agentos.store.retry import TRANSIENT, new_op_id, retry
from agentos.store.snapshots import CHUNK_BYTES, REPLACED_TTL_S
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until
from tests.proxy import CutProxy
from tests.store_support import event_fields, held_lease

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ECHO = "tests.fixture_agents:Echo"
DAY = "2030-01-01"


async def _after_the_cut(proxy: CutProxy, op: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``op`` through retry(): the first attempt loses its reply (the server applied
    it), the second runs only once the server's reply was swallowed."""
    errors: list[StoreError] = []

    async def attempt() -> Any:
        if errors:
            assert await anyio.to_thread.run_sync(proxy.cut.wait, 5.0), "no reply swallowed"
        return await op()

    result = await retry(
        attempt, what="test write", on_retry=lambda e, _d: errors.append(e), attempts=3
    )
    assert proxy.cuts == 1
    assert len(errors) == 1, errors
    assert isinstance(errors[0], StoreUnavailable)
    return result


# ------------------------------------------------------------------ applied once


async def test_a_fenced_write_retried_after_a_lost_reply_is_applied_once(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    held = await held_lease(store, "x")
    assert await store.writes.fenced_write(
        "x", held, Write(status={"phase": "Idle"})
    )  # loads the script
    cut_proxy.cut_after(b"EVALSHA")
    op_id = new_op_id()
    ok = await _after_the_cut(
        cut_proxy,
        lambda: store.writes.fenced_write(
            "x",
            held,
            Write(
                status={"phase": "Stopped"},
                event=event_fields("once"),
                usage=(DAY, {"active_s": 1.5, "tasks_succeeded": 1}),
            ),
            release=True,
            op_id=op_id,
        ),
    )
    assert ok
    assert [e.message for e in await store.events.read("x")] == ["once"]
    assert [e.message for e in await store.events.read() if e.agent == "x"] == ["once"]
    assert (await store.agents.status("x"))["phase"] == "Stopped"
    assert await store.usage.read(["x"], [DAY]) == {
        ("x", DAY): {"active_s": 1.5, "tasks_succeeded": 1}
    }
    assert await store.leases.read(["x"]) == {}
    # A new op id is a new write, and is fenced again.
    assert not await store.writes.fenced_write(
        "x", held, Write(status={"phase": "Running"}), op_id=new_op_id()
    )


async def test_a_send_retried_with_its_send_id_adds_one_message(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    await store.inbox.ensure("x")
    await store.inbox.send("x", "warm-up", send_id=new_op_id())
    cut_proxy.cut_after(b"EVALSHA")
    send_id = new_op_id()
    msg_id = await _after_the_cut(
        cut_proxy, lambda: store.inbox.send("x", "hello", send_id=send_id)
    )
    assert await store.inbox.send("x", "hello", send_id=send_id) == msg_id
    bodies = [m.body for m in await store.inbox.read("x", "c", count=10)]
    assert bodies == ["warm-up", "hello"]


async def test_a_status_batch_retried_unchanged_counts_usage_once(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    leases = {n: await held_lease(store, n) for n in ("a", "b")}
    await store.writes.fenced_status_batch([("a", leases["a"], {"steps": 0}, (DAY, {}), None)])
    batch = [
        (n, leases[n], {"steps": 7}, (DAY, {"active_s": 2.0, "tokens_in": 10.0}), new_op_id())
        for n in ("a", "b")
    ]
    cut_proxy.cut_after(b"EVALSHA")
    assert await _after_the_cut(cut_proxy, lambda: store.writes.fenced_status_batch(batch)) == [
        True,
        True,
    ]
    usage = await store.usage.read(["a", "b"], [DAY])
    assert usage == {(n, DAY): {"active_s": 2.0, "tokens_in": 10.0} for n in ("a", "b")}
    assert (await store.agents.status("a"))["steps"] == "7"


async def test_a_daemon_resends_a_flush_whose_reply_was_lost_and_counts_it_once(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    # Only the flush meters a finished task as usage ("1.0"; status fields say "1").
    cut_proxy.cut_after(b'"tasks_succeeded","1.0"')
    await Client(store).send("echo", "hi")  # read by the runner as it starts
    async with running_daemon(store, metering_flush_s=0.2):
        assert await anyio.to_thread.run_sync(cut_proxy.cut.wait, 10.0)
        ops = int(await store.conn.r.zcard(store.keys.ops("echo")))

        async def next_batch_written() -> bool:
            return int(await store.conn.r.zcard(store.keys.ops("echo"))) > ops

        await wait_until(next_batch_written, what="the flush after the re-sent batch")
        day = time.strftime("%Y-%m-%d", time.gmtime())
        usage = (await store.usage.read(["echo"], [day]))[("echo", day)]
        assert usage["tasks_succeeded"] == 1.0
    assert cut_proxy.cuts == 1


async def test_a_snapshot_saved_again_after_a_lost_commit_reply_leaves_no_orphan_chunks(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    k = store.keys
    held = await held_lease(store, "a")
    big = bytes(range(256)) * (CHUNK_BYTES * 2 // 256 + 1)  # three chunks
    first = await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), big), keep_kv=True
    )
    assert first is not None
    # Only the commit names the manifest key as a key of its own.
    cut_proxy.cut_after(k.kv_manifest("a").encode() + b"\r\n")
    saved = await _after_the_cut(
        cut_proxy,
        lambda: kvsnapshots.save_snapshot(
            store.snapshots, "a", held, KVSnapshot("fp", (1, 2), big), keep_kv=True
        ),
    )
    assert saved is not None
    prefix = k.kv_manifest("a") + ":"
    chunks = [key for key in await store.namespace_keys() if key.startswith(prefix)]
    assert k.kv_pending("a") not in chunks
    ttls = {key: int(await store.conn.r.ttl(key)) for key in chunks}
    kept = {key for key, ttl in ttls.items() if ttl == -1}
    assert kept == {c.key for c in saved.manifest.chunks}
    # The first snapshot's and the first attempt's (committed, then replaced) expire soon.
    assert {c.key for c in first.manifest.chunks} < set(ttls)
    assert len(ttls) == 3 * len(saved.manifest.chunks)
    assert all(0 < ttl <= REPLACED_TTL_S for key, ttl in ttls.items() if key not in kept)
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.snapshot == KVSnapshot("fp", (1, 2), big)


async def test_the_client_never_resends_a_command_whose_connection_was_cut(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    cut_proxy.cut_after(b"XADD")
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        await store.inbox.send("x", "only once")  # MULTI, XADD inbox, XADD signal, EXEC
    assert await anyio.to_thread.run_sync(cut_proxy.cut.wait, 5.0)
    assert int(await store.conn.r.xlen(store.keys.inbox("x"))) == 1
    assert cut_proxy.cuts == 1


async def test_retry_backs_off_gives_up_when_told_and_lets_other_errors_through() -> None:
    calls: list[float] = []
    delays: list[float] = []

    async def down() -> None:
        calls.append(time.monotonic())
        raise StoreFull("Redis at redis://h is full")

    with pytest.raises(StoreFull):
        await retry(
            down, what="t", max_delay_s=0.15, attempts=3, on_retry=lambda _e, d: delays.append(d)
        )
    assert len(calls) == 3
    assert delays == [0.1, 0.15]
    assert set(TRANSIENT) == {StoreUnavailable, StoreFull}

    async def broken() -> None:
        calls.append(0.0)
        raise StoreError("WRONGTYPE")

    calls.clear()
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await retry(broken, what="t")
    assert len(calls) == 1
    assert len(new_op_id()) == 16
    assert new_op_id() != new_op_id()


# ------------------------------------------------------------------ bounded Redis


async def test_1000_messages_leave_every_inbox_empty(store: Store) -> None:
    names = [f"echo-{i}" for i in range(4)]
    await apply(store, *(agent_doc(n, ECHO, triggers=[{"inbox": {}}]) for n in names))
    client = Client(store)
    async with running_daemon(store):
        for i in range(1000):
            await client.send(names[i % 4], f"m{i}")

        async def all_done() -> bool:
            done = 0
            for n in names:
                done += int((await store.agents.status(n)).get("tasks_succeeded") or 0)
            return done >= 1000

        await wait_until(all_done, within=40, what="1000 tasks")
    for n in names:
        assert int(await store.conn.r.xlen(store.keys.inbox(n))) == 0, n
        assert await store.inbox.depth(n) == 0


async def test_inbox_depth_counts_when_acks_delete_out_of_order(store: Store) -> None:
    await store.inbox.ensure("x")
    for body in ("one", "two", "three"):
        await store.inbox.send("x", body)
    first, second = await store.inbox.read("x", "c", count=2)
    held = await held_lease(store, "x")
    assert await store.writes.fenced_write("x", held, Write(ack_id=second.id))  # acked and deleted
    assert await store.inbox.depth("x") == 2  # "one" pending, "three" not yet delivered
    assert [m.body for m in await store.inbox.read("x", "c", pending=True, count=5)] == ["one"]
    assert await store.writes.fenced_write("x", held, Write(ack_id=first.id))
    assert await store.inbox.depth("x") == 1


async def test_what_agents_write_expires(store: Store) -> None:
    held = await held_lease(store, "x")
    k = store.keys
    task = TaskWrite("t1", {"status": "succeeded"}, created_at=time.time(), idempotency_key="k1")
    assert await store.writes.fenced_write(
        "x", held, Write(tasks=(task,), usage=(DAY, {"active_s": 1.0})), op_id=new_op_id()
    )
    await store.inbox.send("x", "hi", send_id="s1")
    await store.heartbeats.beat("d1", {"seen_at": time.time()})
    for key, at_most in [
        (k.usage(name="x", day=DAY), 400 * 86400),
        (k.usage_days("x"), 400 * 86400),
        (k.task("x", "t1"), 7 * 86400),
        (k.tasks("x"), 7 * 86400),
        (k.idempotency("x"), 7 * 86400),
        (k.ops("x"), 3600),
        (k.sent("x", "s1"), 3600),
        (k.daemons, 600),
    ]:
        ttl = int(await store.conn.r.ttl(key))
        assert 0 < ttl <= at_most, (key, ttl)


async def test_heartbeats_forget_daemons_not_seen_for_a_while(store: Store) -> None:
    now = time.time()
    await store.heartbeats.beat("dead", {"seen_at": now - 3600}, now=now - 3600)
    await store.heartbeats.beat("alive", {"seen_at": now - 10}, now=now - 10)
    await store.heartbeats.beat("me", {"seen_at": now}, now=now, forget_after_s=60)
    assert set(await store.heartbeats.daemons()) == {"alive", "me"}


async def test_the_daemon_trims_task_records_on_a_timer(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    client = Client(store)
    for i in range(5):
        await client.send("echo", f"m{i}")
    async with running_daemon(store, task_retention_count=2, task_trim_interval_s=0.1):
        await wait_until(lambda: status_is(store, "echo", tasks_succeeded="5"), what="5 tasks")

        async def trimmed() -> bool:
            return len(await store.tasks.recent("echo", count=100)) <= 2

        await wait_until(trimmed, what="task records trimmed to 2")


async def test_trim_tasks_many_trims_every_agent_in_one_call(store: Store) -> None:
    now = time.time()
    for name in ("a", "b"):
        held = await held_lease(store, name)
        for i in range(4):
            record = TaskWrite(f"t{i}", {"id": f"t{i}"}, created_at=now - 10 + i)
            assert await store.writes.fenced_write(name, held, Write(tasks=(record,)))
    assert await store.tasks.trim_many(["a", "b", "never-ran"], keep=1, max_age_s=86400) == 6
    for name in ("a", "b"):
        assert [t["id"] for t in await store.tasks.recent(name, count=10)] == ["t3"]
