"""The Redis control plane against a real server: apply, leases and fencing, inbox, events."""

from __future__ import annotations

import pytest

from agentos.client import Client, ClientError, NotFound
from agentos.settings import Settings
from agentos.store import Keys, Store, StoreUnavailable, Write, redact_url
from tests.helpers import agent_doc

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ECHO = "tests.fixture_agents:Echo"


async def test_apply_reports_created_configured_unchanged_and_dry_run_writes_nothing(
    store: Store,
) -> None:
    client = Client(store)
    first = await client.apply([agent_doc("a", ECHO), agent_doc("b", ECHO)])
    assert [(c.name, c.action) for c in first] == [("a", "created"), ("b", "created")]
    generation = await store.specs.generation()

    again = await client.apply([agent_doc("a", ECHO), agent_doc("b", ECHO, priority=90)])
    assert [(c.name, c.action) for c in again] == [("a", "unchanged"), ("b", "configured")]
    assert await store.specs.generation() == generation + 1

    before = await store.namespace_keys()
    spec_before = await store.specs.agent("a")
    dry = await client.apply([agent_doc("a", ECHO, priority=1), agent_doc("c", ECHO)], dry_run=True)
    assert [(c.name, c.action) for c in dry] == [("a", "configured"), ("c", "created")]
    assert await store.namespace_keys() == before
    assert await store.specs.agent("a") == spec_before
    assert (await store.specs.desired_index())["b"] == (
        (await store.specs.desired_index())["b"][0],
        90,
    )


async def test_a_stale_lease_holder_cannot_write(store: Store) -> None:
    token = await store.leases.acquire("x", "d1", 60_000)
    assert token > 0
    assert await store.leases.acquire("x", "d2", 60_000) == 0
    assert await store.leases.acquire("x", "d1", 60_000) == token  # our own: extended
    mine = f"d1|{token}"
    assert await store.writes.fenced_write("x", mine, Write(status={"phase": "Idle"}, state=b"{}"))

    # d1 loses the lease (it expired); d2 takes it with a new fencing token.
    assert await store.leases.release("x", mine)
    token2 = await store.leases.acquire("x", "d2", 60_000)
    assert token2 > token
    assert not await store.writes.fenced_write(
        "x", mine, Write(status={"phase": "Running"}, state=b"stale")
    )
    assert await store.leases.renew({"x": mine}, 60_000) == {"x": False}
    assert (await store.agents.status("x"))["phase"] == "Idle"
    assert await store.agents.load_state("x") == b"{}"
    assert await store.leases.release("x", mine) is False


async def test_state_and_inbox_ack_are_written_together(store: Store) -> None:
    await store.inbox.ensure("x")
    await Client(store).store.inbox.send("x", "hello")
    (msg,) = await store.inbox.read("x", "d1", count=10)
    assert await store.inbox.depth("x") == 1
    token = await store.leases.acquire("x", "d1", 60_000)
    assert await store.writes.fenced_write(
        "x", f"d1|{token}", Write(state=b'{"n":1}', ack_id=msg.id)
    )
    assert await store.inbox.depth("x") == 0
    assert await store.agents.load_state("x") == b'{"n":1}'


async def test_a_new_reader_takes_over_a_dead_readers_pending_messages(store: Store) -> None:
    await store.inbox.ensure("x")
    for body in ("one", "two"):
        await store.inbox.send("x", body)
    assert len(await store.inbox.read("x", "dead-daemon", count=10)) == 2
    assert await store.inbox.claim("x", "new-daemon") == 2
    pending = await store.inbox.read("x", "new-daemon", count=10, pending=True)
    assert [m.body for m in pending] == ["one", "two"]


async def test_every_agent_key_carries_the_agent_hash_tag() -> None:
    keys = Keys("ns")
    for key in [*keys.agent_keys("repo-watcher"), keys.fence("repo-watcher")]:
        assert "{repo-watcher}" in key
        assert key.startswith("ns:")
    assert "{repo-watcher}" in keys.applied("repo-watcher")
    fleet = [keys.specs, keys.index, keys.generation, keys.layout]
    assert all("{fleet}" in k for k in fleet)
    assert all("{signals:" in k for k in keys.signal_streams())
    assert all("{events:" in k for k in keys.feed_streams())
    with pytest.raises(ValueError, match="invalid namespace"):
        Keys("a{b}")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
        ("redis://host:6379", "redis://host:6379"),
        ("unix:///tmp/v.sock", "unix:///tmp/v.sock"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_unreachable_redis_names_the_url_without_the_password() -> None:
    with pytest.raises(StoreUnavailable) as info:
        await Store.connect("redis://user:hunter2@127.0.0.1:1/0", timeout_s=1)
    assert "127.0.0.1:1" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_client_refuses_unknown_agents_and_oversized_messages(store: Store) -> None:
    client = Client(store)
    await client.apply([agent_doc("small", ECHO, triggers=[{"inbox": {"maxMessageBytes": 5}}])])
    before = await store.namespace_keys()
    with pytest.raises(NotFound, match='agent "nobody" not found'):
        await client.send("nobody", "hi")
    with pytest.raises(ClientError, match="accepts at most 5"):
        await client.send("small", "too long")
    assert await store.namespace_keys() == before


async def test_client_without_redis_says_how_to_get_one(tmp_path: object) -> None:
    with pytest.raises(ClientError, match="agentos up"):
        await Client.connect(Settings(redis_url=None, home=tmp_path))  # type: ignore[arg-type]


async def test_configured_changes_name_the_fields_that_changed(store: Store) -> None:
    client = Client(store)
    await client.apply([agent_doc("a", ECHO, config={"limit": 1, "keep": True})])
    (change,) = await client.apply(
        [agent_doc("a", ECHO, priority=7, config={"limit": 2, "keep": True})], dry_run=True
    )
    assert change.action == "configured"
    assert change.fields == ("spec.config.limit", "spec.priority")


async def test_task_records_are_trimmed_by_count_and_age(store: Store) -> None:
    import time

    from agentos.store import TaskWrite

    held = f"d1|{await store.leases.acquire('x', 'd1', 60_000)}"
    now = time.time()
    for i in range(6):
        created = now - 86400 * 10 if i == 0 else now - 10 + i  # the first is ten days old
        record = TaskWrite(f"t{i}", {"id": f"t{i}", "status": "succeeded"}, created_at=created)
        assert await store.writes.fenced_write("x", held, Write(tasks=(record,)))
    await store.conn.r.zadd(store.keys.idempotency("x"), {"old-key": now - 86400 * 10, "new": now})
    removed = await store.tasks.trim("x", keep=3, max_age_s=7 * 86400)
    assert removed == 3
    assert [t["id"] for t in await store.tasks.recent("x", count=10)] == ["t5", "t4", "t3"]
    assert await store.tasks.get("x", "t0") == {}
    assert not await store.tasks.idempotency_done("x", "old-key")
    assert await store.tasks.idempotency_done("x", "new")
