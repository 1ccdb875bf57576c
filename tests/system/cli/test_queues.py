"""Bounded queues and honest sends (issue 22, item 4), against a real Redis and Cluster.

An inbox holds at most ``maxDepth`` messages (the check is in the script that enqueues);
a checked send to a name nobody applied leaves no key behind; a send id reused with
another body is a conflict; events nobody waits for are capped per agent; a poison
message can be dropped, and one that failed too often waits among the agent's dead
letters until it is re-driven or dropped. The CLI says each in one line. (Poison
messages and what a dropped or parked message does to a running agent:
test_queues_poison.py.)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

import agentos
from agentos.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Client,
    ClientError,
    EventsFull,
    InboxFull,
    NotFound,
    SendConflict,
)
from agentos.core.spec import INBOX_MAX_DEPTH, AgentResource, SpecError
from agentos.core.waits import Resolution
from agentos.store import EventsFull as StoreEventsFull
from agentos.store import InboxFull as StoreInboxFull
from agentos.store import SendConflict as StoreSendConflict
from agentos.store import SendRefused, Store, Write
from agentos.store import inbox as inbox_module
from agentos.store.waits import BUFFERED_EVENT_BYTES_MAX, BUFFERED_EVENTS_MAX
from tests.cli_support import cli, show
from tests.helpers import agent_doc, apply, inbox_triggers, running_daemon, wait_until
from tests.store_support import held_lease

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ECHO = "tests.fixture_agents:Echo"
CHECK = DEFAULT_MAX_MESSAGE_BYTES


async def checked_send(store: Store, name: str, body: str, **kw: Any) -> str:
    return await store.inbox.send(name, body, check_limit=CHECK, **kw)


# ---------------------------------------------------------------------- maxDepth


def test_max_depth_is_optional_validated_and_left_out_of_the_canonical_form() -> None:
    given = agent_doc("a", ECHO, triggers=inbox_triggers(5))
    default = agent_doc("b", ECHO, triggers=inbox_triggers())
    assert given.canonical()["spec"]["triggers"] == [
        {"inbox": {"maxMessageBytes": 1_048_576, "maxDepth": 5}}
    ]
    assert default.canonical()["spec"]["triggers"] == [{"inbox": {"maxMessageBytes": 1_048_576}}]
    a, b = given.resource, default.resource
    assert isinstance(a, AgentResource)
    assert isinstance(b, AgentResource)
    assert a.spec.triggers[0].inbox is not None
    assert a.spec.triggers[0].inbox.depth_limit == 5
    assert b.spec.triggers[0].inbox is not None
    assert b.spec.triggers[0].inbox.depth_limit == INBOX_MAX_DEPTH == 10_000
    with pytest.raises(SpecError, match=r"spec\.triggers\[0\]\.inbox\.maxDepth"):
        agent_doc("c", ECHO, triggers=inbox_triggers(0))


async def test_a_send_beyond_max_depth_is_refused_and_nothing_is_enqueued(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers(3)))
    ids = [await checked_send(store, "echo", f"m{i}") for i in range(3)]
    with pytest.raises(StoreInboxFull) as info:
        await checked_send(store, "echo", "one too many")
    assert (info.value.depth, info.value.limit) == (3, 3)
    assert info.value.retry_after_s > 0
    assert await store.inbox.depth("echo") == 3
    # An acknowledged message leaves the inbox (acks delete): there is room again.
    held = await held_lease(store, "echo")
    await store.inbox.ensure("echo")
    await store.inbox.read("echo", "d1", count=1)
    assert await store.writes.fenced_write("echo", held, Write(ack_id=ids[0]))
    assert await checked_send(store, "echo", "room again")
    assert await store.inbox.depth("echo") == 3


async def test_the_default_depth_holds_for_agents_applied_without_one(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO))  # no inbox trigger at all: the default
    marker = (await store.conn.r.get(store.keys.applied("echo"))).decode()
    assert marker.endswith(f" {INBOX_MAX_DEPTH}")
    # A marker written before maxDepth existed ("hash priority bytes") gets the default.
    await store.conn.r.set(store.keys.applied("echo"), marker.rsplit(" ", 1)[0])
    stream = store.keys.inbox("echo")
    for start in range(0, INBOX_MAX_DEPTH, 2000):
        async with store.conn.r.pipeline(transaction=False) as pipe:
            for i in range(start, start + 2000):
                pipe.xadd(stream, {"body": str(i)})
            await pipe.execute()
    with pytest.raises(StoreInboxFull) as info:
        await checked_send(store, "echo", "over")
    assert info.value.limit == INBOX_MAX_DEPTH


async def test_a_checked_send_to_a_missing_agent_creates_no_key(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers()))
    before = await store.namespace_keys()
    with pytest.raises(SendRefused):
        await checked_send(store, "nobody", "hello", send_id="s1")
    with pytest.raises(NotFound):
        await Client(store).send("nobody", "hello")
    assert await store.namespace_keys() == before


# ---------------------------------------------------------------------- send ids


async def test_a_send_id_with_another_body_is_a_conflict(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers()))
    first = await checked_send(store, "echo", "v1", send_id="k1", digest="aaa")
    assert await checked_send(store, "echo", "v1", send_id="k1", digest="aaa") == first
    with pytest.raises(StoreSendConflict) as info:
        await checked_send(store, "echo", "v2", send_id="k1", digest="bbb")
    assert info.value.message_id == first
    # A sender that gives no digest (an older client) keeps the old at-most-once reply.
    assert await checked_send(store, "echo", "v3", send_id="k1") == first
    # A dedupe entry written before digests existed holds only the id: a replay.
    await store.conn.r.set(store.keys.sent("echo", "old"), "1-1", ex=60)
    assert await checked_send(store, "echo", "v4", send_id="old", digest="ccc") == "1-1"
    assert await store.inbox.depth("echo") == 1
    client = Client(store)
    again = await client.send("echo", "w1", send_id="k2")
    assert await client.send("echo", "w1", send_id="k2") == again
    with pytest.raises(SendConflict) as conflict:
        await client.send("echo", "w2", send_id="k2")
    assert isinstance(conflict.value, ClientError)
    assert conflict.value.message_id == again


async def test_a_full_inbox_is_a_client_error_with_the_numbers(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers(1)))
    client = Client(store)
    await client.send("echo", "first")
    with pytest.raises(InboxFull) as info:
        await client.send("echo", "second")
    e = info.value
    assert isinstance(e, ClientError)
    assert (e.name, e.depth, e.limit) == ("echo", 1, 1)
    assert "\n" not in str(e)
    assert "maxDepth 1" in str(e)


# ---------------------------------------------------------------------- buffered events


async def test_events_nobody_waits_for_are_capped_by_count_and_bytes(store: Store) -> None:
    await apply(store, agent_doc("a", ECHO), agent_doc("b", ECHO))

    async def event(agent: str, name: str, data: Any) -> bool:
        resolution = Resolution("event", data, "test", time.time())
        return await store.waits.event(agent, name, resolution, now=time.time(), event_id=name)

    for i in range(BUFFERED_EVENTS_MAX):
        assert await event("a", f"e{i}", i) is False
    with pytest.raises(StoreEventsFull) as count:
        await event("a", "one-more", 0)
    assert (count.value.what, count.value.limit) == ("count", BUFFERED_EVENTS_MAX)
    assert await event("a", "e3", "new value") is False  # a kept name is replaced
    kept = await store.conn.r.hgetall(store.keys.wait_events("a"))
    assert len(kept) == BUFFERED_EVENTS_MAX

    chunk = "x" * (BUFFERED_EVENT_BYTES_MAX // 4)
    for i in range(3):
        await event("b", f"big{i}", chunk)
    with pytest.raises(StoreEventsFull) as size:
        await event("b", "big3", chunk + "x" * 1000)
    assert size.value.what == "bytes"
    assert await event("b", "big0", "small") is False  # replacing frees its bytes
    with pytest.raises(EventsFull) as client_side:
        await Client(store).send_event("a", "another", {}, by="test")
    assert isinstance(client_side.value, ClientError)
    assert "does not wait" in str(client_side.value)


# ---------------------------------------------------------------------- drop, dead letters


async def test_drop_removes_a_read_message_records_it_and_tells_the_owner(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers()))
    await store.inbox.ensure("echo")
    poison = await checked_send(store, "echo", "poison")
    other = await checked_send(store, "echo", "fine")
    await store.inbox.read("echo", "d1", count=10)  # delivered, not acknowledged
    await held_lease(store, "echo")
    assert await Client(store).drop("echo", f"m-{poison}", by="ops") == "inbox"
    assert await store.inbox.depth("echo") == 1
    pending = await store.inbox.read("echo", "d1", count=10, pending=True)
    assert [m.id for m in pending] == [other]
    record = await store.tasks.get("echo", f"m-{poison}")
    assert (record["status"], record["result"], record["trigger"]) == (
        "dropped",
        "dropped by ops",
        "inbox",
    )
    assert f"m-{poison}" in [t["id"] for t in await store.tasks.recent("echo")]
    event = (await store.events.read("echo"))[-1]
    assert (event.type, event.reason) == ("Dropped", "Dropped")
    assert "ops" in event.message
    assert "Dropped" in [e.type for e in await store.events.read(None)]

    async def drop_signalled() -> bool:
        stream = store.keys.signals(store.keys.signal_shard("echo"))
        entries = await store.conn.r.xrevrange(stream, count=5)
        return any(
            f.get(b"cmd") == b"drop" and f.get(b"task") == f"m-{poison}".encode()
            for _, f in entries
        )

    assert await drop_signalled()
    with pytest.raises(NotFound, match="no message to drop"):
        await Client(store).drop("echo", f"m-{poison}", by="ops")
    with pytest.raises(NotFound):
        await Client(store).drop("echo", "heartbeat-1-2", by="ops")


async def test_a_dead_letter_is_moved_atomically_listed_redriven_and_dropped(
    store: Store,
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers()))
    await store.inbox.ensure("echo")
    client = Client(store)
    msg = await client.send("echo", "poison", key="k-1")
    await store.inbox.read("echo", "d1", count=1)
    stale = await held_lease(store, "echo", "old")
    await store.conn.r.delete(store.keys.lease("echo"))
    held = await held_lease(store, "echo")
    task = f"m-{msg}"
    moved = await store.poison.dead_letter(
        "echo", stale, msg, task_id=task, attempts=5, error="RuntimeError: boom"
    )
    assert moved == "not-held"
    assert await store.inbox.depth("echo") == 1
    moved = await store.poison.dead_letter(
        "echo", held, msg, task_id=task, attempts=5, error="RuntimeError: boom", daemon="d1"
    )
    assert moved == "moved"
    again = await store.poison.dead_letter("echo", held, msg, task_id=task, attempts=5, error="x")
    assert again == "gone"  # a retry after a lost reply changes nothing
    assert await store.inbox.depth("echo") == 0
    assert await store.inbox.read("echo", "d1", count=10, pending=True) == []
    (letter,) = await client.dead_letters("echo")
    assert (letter["task"], letter["body"], letter["key"]) == (task, "poison", "k-1")
    assert (letter["attempts"], letter["error"]) == ("5", "RuntimeError: boom")
    record = await store.tasks.get("echo", task)
    assert (record["status"], record["error"]) == ("dead", "RuntimeError: boom")
    assert (await store.events.read("echo"))[-1].type == "DeadLettered"

    new = await client.retry_dead("echo", task, by="ops")
    assert new != msg
    assert await client.dead_letters("echo") == []
    (resent,) = await store.inbox.read("echo", "d1", count=10)
    assert (resent.id, resent.body, resent.key) == (new, "poison", "k-1")
    assert (await store.tasks.get("echo", task))["redriven_as"] == f"m-{new}"
    event = (await store.events.read("echo"))[-1]
    assert event.type == "Redriven"
    assert f"m-{new}" in event.message
    with pytest.raises(NotFound, match="not a dead letter"):
        await client.retry_dead("echo", task, by="ops")

    # Dead again, then dropped from the dead letters for good.
    assert await store.poison.dead_letter(
        "echo", held, new, task_id=f"m-{new}", attempts=5, error="e"
    )
    assert await client.drop("echo", f"m-{new}", by="ops") == "dead"
    assert await client.dead_letters("echo") == []
    assert (await store.tasks.get("echo", f"m-{new}"))["status"] == "dropped"


async def test_dead_letters_are_bounded_and_a_redrive_respects_max_depth(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "DEAD_LETTERS_KEPT", 3)
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers(2)))
    await store.inbox.ensure("echo")
    held = await held_lease(store, "echo")
    tasks = []
    for i in range(5):
        msg = await checked_send(store, "echo", f"m{i}")
        tasks.append(f"m-{msg}")
        assert await store.poison.dead_letter(
            "echo", held, msg, task_id=tasks[-1], attempts=1, error="e"
        )
    letters = await store.poison.dead_letters("echo")
    assert [d["task"] for d in letters] == tasks[:1:-1]  # newest first, the oldest gone
    await checked_send(store, "echo", "a")
    await checked_send(store, "echo", "b")
    with pytest.raises(InboxFull):
        await Client(store).retry_dead("echo", tasks[-1], by="ops")
    assert len(await store.poison.dead_letters("echo")) == 3


async def test_deleting_an_agent_removes_its_dead_letters(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers()))
    await store.inbox.ensure("echo")
    held = await held_lease(store, "echo")
    msg = await checked_send(store, "echo", "m")
    assert await store.poison.dead_letter(
        "echo", held, msg, task_id=f"m-{msg}", attempts=1, error="e"
    )
    assert store.keys.dead("echo") in store.keys.agent_keys("echo")
    assert store.keys.dead_order("echo") in store.keys.agent_keys("echo")


# ---------------------------------------------------------------------- the runner's ctx.send


class Forwarder(agentos.Agent):
    """Forwards every message to ``config.to`` with ``ctx.send``; a refusal is its result."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        try:
            return await ctx.send(str(ctx.config["to"]), plan.body)
        except agentos.NotFound as e:
            return f"refused: {e}"


async def test_ctx_send_to_a_missing_agent_is_refused_and_leaves_no_key(
    store: Store,
) -> None:
    await apply(
        store,
        agent_doc(
            "fwd",
            "tests.system.cli.test_queues:Forwarder",
            triggers=inbox_triggers(),
            config={"to": "nobody"},
        ),
    )
    msg = await Client(store).send("fwd", "hello")
    async with running_daemon(store):

        async def finished() -> dict[str, str] | None:
            record = await store.tasks.get("fwd", f"m-{msg}")
            return record if record.get("status") in ("succeeded", "failed") else None

        record = await wait_until(finished, within=20, what="the forwarding task")
    assert not [k for k in await store.namespace_keys() if "{nobody}" in k]
    assert record["result"] == 'refused: agent "nobody" not found'


# ---------------------------------------------------------------------- the CLI


async def test_the_cli_refuses_a_full_inbox_in_one_line_and_handles_poison(
    env: dict[str, str],
    store: Store,
    tmp_path: Path,
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=inbox_triggers(1)))
    ok = await cli(env, "send", "echo", "poison")
    assert ok.returncode == 0, show(ok)
    msg = re.fullmatch(r"sent (\d+-\d+) to echo\n", ok.stdout)
    assert msg, ok.stdout
    full = await cli(env, "send", "echo", "more")
    assert full.returncode == 1, show(full)
    assert full.stdout == ""
    assert full.stderr.count("\n") == 1, full.stderr
    assert full.stderr.startswith('error: the inbox of agent "echo" is full: 1 messages')

    task = f"m-{msg.group(1)}"
    await store.inbox.ensure("echo")
    await store.inbox.read("echo", "d1", count=1)
    held = await held_lease(store, "echo")
    assert await store.poison.dead_letter(
        "echo", held, msg.group(1), task_id=task, attempts=5, error="boom\x1b[2J"
    )
    dead = await cli(env, "tasks", "echo", "--dead")
    assert dead.returncode == 0, show(dead)
    assert task in dead.stdout
    assert "poison" in dead.stdout
    assert "\x1b" not in dead.stdout  # the error is data: escaped
    as_json = await cli(env, "tasks", "echo", "--dead", "-o", "json")
    assert [d["task"] for d in json.loads(as_json.stdout)] == [task]

    retried = await cli(env, "tasks", "retry", "echo", task, "--as", "ops")
    assert retried.returncode == 0, show(retried)
    new = re.fullmatch(rf"task {task} of echo sent again as (m-\d+-\d+)\n", retried.stdout)
    assert new, retried.stdout
    dropped = await cli(env, "tasks", "drop", "echo", new.group(1), "--as", "ops")
    assert dropped.returncode == 0, show(dropped)
    assert dropped.stdout == f"task {new.group(1)} of echo dropped (from the inbox)\n"
    assert await store.inbox.depth("echo") == 0
    gone = await cli(env, "tasks", "drop", "echo", new.group(1))
    assert gone.returncode == 1, show(gone)
    assert gone.stderr.startswith("error: task"), show(gone)
    usage = await cli(env, "tasks", "echo", "extra")
    assert usage.returncode == 2, show(usage)

    for i in range(BUFFERED_EVENTS_MAX):
        resolution = Resolution("event", i, "test", time.time())
        await store.waits.event("echo", f"e{i}", resolution, now=time.time(), event_id=str(i))
    refused = await cli(env, "event", "echo", "one-more", "{}")
    assert refused.returncode == 1, show(refused)
    assert refused.stderr.startswith('error: agent "echo" does not wait for event "one-more"')
    assert refused.stderr.count("\n") == 1
