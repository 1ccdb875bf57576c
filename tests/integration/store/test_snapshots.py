"""KV snapshots in Redis: chunked, checksummed, committed last, and every fault survivable."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
import pytest

from agentos.client import Client
from agentos.engine import KVSnapshot, SimEngine
from agentos.runtime import kvsnapshots
from agentos.store import Store
from agentos.store.snapshots import CHUNK_BYTES, REPLACED_TTL_S
from tests.fixture_agents import EchoState
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

BIG = bytes(range(256)) * (CHUNK_BYTES * 3 // 256 + 7)  # a bit over three chunks


async def lease(store: Store, name: str = "a") -> str:
    token = await store.leases.acquire(name, "d1", 60_000)
    return f"d1|{token}"


async def test_a_snapshot_round_trips_in_chunks(store: Store) -> None:
    held = await lease(store)
    snap = KVSnapshot("fp-1", (1, 2, 3), BIG)
    saved = await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, snap, keep_kv=True, reason="test"
    )
    assert saved is not None
    assert len(saved.manifest.chunks) == 4
    assert all(c.size <= CHUNK_BYTES for c in saved.manifest.chunks)
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.reason == "valid"
    assert loaded.snapshot == snap
    assert loaded.nbytes == len(BIG)


async def test_a_chat_conversation_is_kept_with_and_without_the_kv(store: Store) -> None:
    held = await lease(store)
    chat = '{"messages": [{"role": "user", "content": "h\u00e9 \u2603"}]}'.encode()
    with_kv = KVSnapshot("fp", (1, 2), b"kv", conversation=chat)
    assert await kvsnapshots.save_snapshot(store.snapshots, "a", held, with_kv, keep_kv=True)
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.snapshot == with_kv
    assert loaded.conversation == chat
    # Without the KV bytes (keepKV said recompute) the conversation still comes back, and
    # the replaced snapshot's chunks still expire (the commit script reads its manifest).
    first = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert first.manifest is not None
    assert await kvsnapshots.save_snapshot(store.snapshots, "a", held, with_kv, keep_kv=False)
    history_only = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert history_only.snapshot is None
    assert history_only.conversation == chat
    for c in first.manifest.chunks:
        assert 0 < int(await store.conn.r.ttl(c.key)) <= REPLACED_TTL_S


async def test_a_new_snapshot_replaces_the_old_and_its_chunks_expire_soon(store: Store) -> None:
    held = await lease(store)
    first = await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), BIG), keep_kv=True
    )
    second = await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1, 2), b"x" * 10), keep_kv=True
    )
    assert first is not None
    assert second is not None
    # Not deleted at once: a reader that got the old manifest still finds its chunks.
    for c in first.manifest.chunks:
        assert 0 < int(await store.conn.r.ttl(c.key)) <= REPLACED_TTL_S, c.key
    assert [int(await store.conn.r.ttl(c.key)) for c in second.manifest.chunks] == [-1]
    assert (await kvsnapshots.load_snapshot(store.snapshots, "a")).tokens == (1, 2)


async def test_a_commit_expires_only_the_agents_own_chunks_named_by_the_old_manifest(
    store: Store,
) -> None:
    held = await lease(store)
    k = store.keys
    first = await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), b"old"), keep_kv=True
    )
    assert first is not None
    # A manifest that names another agent's key and a key outside any snapshot:
    raw = msgspec.msgpack.decode(await store.conn.r.get(k.kv_manifest("a")))
    others = [k.kv_chunk("b", first.manifest.id, 0), k.state("a")]
    raw["chunks"] += [{"key": key, "size": 1, "digest": ""} for key in others]
    await store.conn.r.set(k.kv_manifest("a"), msgspec.msgpack.encode(raw))
    for key in others:
        await store.conn.r.set(key, b"keep")
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (2,), b"new"), keep_kv=True
    )
    assert [int(await store.conn.r.ttl(key)) for key in others] == [-1, -1]
    assert int(await store.conn.r.ttl(first.manifest.chunks[0].key)) > 0
    # A manifest that does not decode is replaced all the same.
    await store.conn.r.set(k.kv_manifest("a"), b"\x93not a manifest")
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (3,), b"x"), keep_kv=True
    )
    assert (await kvsnapshots.load_snapshot(store.snapshots, "a")).tokens == (3,)


async def test_without_keep_kv_only_the_token_history_is_stored(store: Store) -> None:
    held = await lease(store)
    saved = await kvsnapshots.save_snapshot(
        store.snapshots,
        "a",
        held,
        KVSnapshot("fp", (5, 6, 7), BIG),
        keep_kv=False,
        reason="keepKV: never",
    )
    assert saved is not None
    assert saved.manifest.chunks == []
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.snapshot is None
    assert loaded.tokens == (5, 6, 7)
    assert "keepKV: never" in loaded.reason


async def test_a_daemon_without_the_lease_cannot_commit(store: Store) -> None:
    held = await lease(store)
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), b"old"), keep_kv=True
    )
    stale = "d0|999"
    assert (
        await kvsnapshots.save_snapshot(
            store.snapshots, "a", stale, KVSnapshot("fp", (9,), BIG), keep_kv=True
        )
        is None
    )
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.snapshot == KVSnapshot("fp", (1,), b"old")
    assert len([k for k in await store.namespace_keys() if ":kv:" in k]) == 1  # no orphans


async def test_a_writer_killed_before_commit_leaves_the_old_snapshot_valid(store: Store) -> None:
    held = await lease(store)
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1,), b"old"), keep_kv=True
    )
    # What a process killed between writing chunks and committing leaves behind:
    k = store.keys
    await store.conn.r.set(k.kv_pending("a"), msgspec.msgpack.encode({"id": "dead", "n_chunks": 2}))
    await store.conn.r.set(k.kv_chunk("a", "dead", 0), b"half")
    loaded = await kvsnapshots.load_snapshot(store.snapshots, "a")
    assert loaded.snapshot == KVSnapshot("fp", (1,), b"old")
    # The next save cleans the dead writer's chunks up.
    assert await kvsnapshots.save_snapshot(
        store.snapshots, "a", held, KVSnapshot("fp", (1, 2), b"new"), keep_kv=True
    )
    keys = await store.namespace_keys()
    assert k.kv_chunk("a", "dead", 0) not in keys
    assert k.kv_pending("a") not in keys


Tamper = Callable[[Store], Awaitable[None]]


async def _corrupt_chunk(store: Store) -> None:
    manifest = await store.snapshots.manifest("chat")
    assert manifest is not None
    await store.conn.r.setrange(manifest.chunks[0].key, 10, b"rot")


async def _evict_chunk(store: Store) -> None:
    manifest = await store.snapshots.manifest("chat")
    assert manifest is not None
    await store.conn.r.delete(manifest.chunks[-1].key)


async def _drop_manifest(store: Store) -> None:
    await store.conn.r.delete(store.keys.kv_manifest("chat"))


async def _garble_manifest(store: Store) -> None:
    await store.conn.r.set(store.keys.kv_manifest("chat"), b"\x93not a manifest")


async def _other_model(store: Store) -> None:
    raw = msgspec.msgpack.decode(await store.conn.r.get(store.keys.kv_manifest("chat")))
    raw["fingerprint"] = "llama:another-model"
    await store.conn.r.set(store.keys.kv_manifest("chat"), msgspec.msgpack.encode(raw))


async def _half_written_newer(store: Store) -> None:
    k = store.keys
    await store.conn.r.set(k.kv_pending("chat"), msgspec.msgpack.encode({"id": "x", "n_chunks": 3}))
    await store.conn.r.set(k.kv_chunk("chat", "x", 0), b"partial")


@pytest.mark.parametrize(
    ("tamper", "path", "why"),
    [
        (_corrupt_chunk, "recompute", "corrupt"),
        (_evict_chunk, "recompute", "missing"),
        (_other_model, "recompute", "another engine build"),
        (_half_written_newer, "restore", "KV restored"),
        (_drop_manifest, "empty", "no snapshot"),
        (_garble_manifest, "empty", "manifest unreadable"),
    ],
    ids=[
        "corrupt-chunk",
        "evicted-chunk",
        "other-model",
        "killed-mid-hibernation",
        "missing-manifest",
        "garbled-manifest",
    ],
)
async def test_every_bad_snapshot_still_wakes_an_agent_that_answers(
    store: Store, tamper: Tamper, path: str, why: str
) -> None:
    await apply(
        store,
        agent_doc(
            "chat",
            "tests.fixture_agents:Echo",
            triggers=[{"inbox": {}}],
            config={"llm": True},
            hibernation={"keepKV": "always"},
        ),
    )
    client = Client(store)
    engine = SimEngine(seed=3, kv_bytes_per_token=CHUNK_BYTES // 4)  # several chunks
    async with running_daemon(store, engine):
        await client.send("chat", "first question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="1"))
        await client.hibernate("chat")
        await wait_until(lambda: status_is(store, "chat", phase="Hibernated"))
        await tamper(store)
        await client.send("chat", "second question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="2"))
    (woke,) = [e for e in await store.events.read("chat") if e.type == "Woke"]
    assert woke.reason == path
    assert why in woke.message
    raw = await store.agents.load_state("chat")
    assert raw is not None
    state = msgspec.json.decode(raw, type=EchoState)
    assert len(state.replies) == 2
    assert state.replies[1]

    reference = SimEngine(seed=3)
    reference.open_session("ref")
    await reference.generate("ref", "first question", max_tokens=8)
    expected = await reference.generate("ref", "second question", max_tokens=8)
    if path in ("restore", "recompute"):  # the context survived: same continuation
        assert state.replies[1] == expected.text


async def test_a_snapshot_from_another_engine_configuration_is_recomputed(store: Store) -> None:
    await apply(
        store,
        agent_doc(
            "chat", "tests.fixture_agents:Echo", triggers=[{"inbox": {}}], config={"llm": True}
        ),
    )
    client = Client(store)
    async with running_daemon(store, SimEngine(seed=3, n_ctx=8192)):
        await client.send("chat", "first question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="1"))
    # The daemon hibernated the agent on shutdown; a daemon with another n_ctx wakes it.
    assert (await store.agents.status("chat"))["phase"] == "Hibernated"
    async with running_daemon(store, SimEngine(seed=3, n_ctx=4096)):
        await client.send("chat", "second question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="2"))
    woke = [e for e in await store.events.read("chat") if e.type == "Woke"]
    assert woke[-1].reason == "recompute"
    assert "another engine build" in woke[-1].message
