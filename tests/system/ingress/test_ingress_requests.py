"""The HTTP ingress answers honestly (issue 22, item 5): a replayed idempotency key gets
the first task, a reused one with another body is a conflict, full queues answer 429 with
Retry-After, lists come in pages that read only their agents, and the daemon's ingress
refuses rebinding and logs a hang-up once."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentos.store import Store
from tests.cli_support import base_env, exited, spawn
from tests.helpers import agent_doc, apply, free_port, wait_until
from tests.ingress_support import ECHO, JSON, http, park

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------- idempotency


async def test_a_replayed_idempotency_key_answers_the_first_task(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    key = {"Idempotency-Key": "deploy-42"}
    async with http(store) as c:
        first = await c.post("/v1/agents/echo/messages", content="deploy", headers=key)
        again = await c.post("/v1/agents/echo/messages", content="deploy", headers=key)
        other = await c.post("/v1/agents/echo/messages", content="deploy", headers={})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["taskId"] == first.json()["taskId"]
    assert other.json()["taskId"] != first.json()["taskId"]
    assert await store.inbox.depth("echo") == 2


async def test_an_idempotency_key_reused_with_another_body_is_a_conflict(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    key = {"Idempotency-Key": "deploy-42"}
    async with http(store) as c:
        first = await c.post("/v1/agents/echo/messages", content="deploy v1", headers=key)
        other = await c.post("/v1/agents/echo/messages", content="deploy v2", headers=key)
        again = await c.post("/v1/agents/echo/messages", content="deploy v1", headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "conflict"
    assert other.json()["taskId"] == first.json()["taskId"]  # the message the key made
    assert (again.status_code, again.json()["taskId"]) == (202, first.json()["taskId"])
    await store.inbox.ensure("echo")
    assert [m.body for m in await store.inbox.read("echo", "c", count=10)] == ["deploy v1"]


async def test_a_full_inbox_answers_429_with_retry_after(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {"maxDepth": 2}}]))
    async with http(store) as c:
        sent = [await c.post("/v1/agents/echo/messages", content=f"m{i}") for i in range(3)]
    assert [r.status_code for r in sent] == [202, 202, 429]
    full = sent[-1]
    assert full.json()["error"]["code"] == "inbox_full"
    assert int(full.headers["retry-after"]) >= 1
    assert await store.inbox.depth("echo") == 2


async def test_events_nobody_waits_for_are_capped_with_a_429(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO))
    async with http(store) as c:
        kept = [
            await c.post(f"/v1/agents/echo/events/e{i}", json={"n": i}, headers=JSON)
            for i in range(100)
        ]
        refused = await c.post("/v1/agents/echo/events/e100", json={}, headers=JSON)
        replaced = await c.post("/v1/agents/echo/events/e7", json={"n": 70}, headers=JSON)
    assert {r.status_code for r in kept} == {202}
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "events_full")
    assert replaced.status_code == 202  # latest of a kept name wins: no new place


async def test_drop_over_http_removes_the_message(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    async with http(store) as c:
        sent = (await c.post("/v1/agents/echo/messages", content="poison")).json()
        plain = await c.post(f"/v1/agents/echo/tasks/{sent['taskId']}/drop")
        dropped = await c.post(
            f"/v1/agents/echo/tasks/{sent['taskId']}/drop", json={"by": "ops"}, headers=JSON
        )
        again = await c.post(f"/v1/agents/echo/tasks/{sent['taskId']}/drop", json={}, headers=JSON)
    assert plain.status_code == 415  # a state change takes JSON, as answers do
    assert (dropped.status_code, dropped.json()["droppedFrom"]) == (200, "inbox")
    assert again.status_code == 404
    assert await store.inbox.depth("echo") == 0
    record = await store.tasks.get("echo", sent["taskId"])
    assert record["status"] == "dropped"
    assert "ops (http:loopback)" in record["result"]
    assert [e.type for e in await store.events.read("echo")][-1] == "Dropped"


# ---------------------------------------------------------------------- pages


async def pages(c: httpx.AsyncClient, url: str) -> list[list[dict[str, Any]]]:
    """Every page of a list endpoint, following its ``Link: rel="next"`` headers."""
    out = []
    next_url: str | None = url
    while next_url is not None:
        r = await c.get(next_url)
        assert r.status_code == 200, r.text
        out.append(r.json())
        next_url = r.links.get("next", {}).get("url")
        assert len(out) < 20
    return out


async def test_list_endpoints_are_paginated(store: Store) -> None:
    names = [f"a{i}" for i in range(7)]
    await apply(store, *(agent_doc(n, ECHO) for n in names))
    for n in ("a1", "a2", "a5"):
        await park(store, n)
    async with http(store) as c:
        agents = await pages(c, "/v1/agents?limit=3")
        waits = await pages(c, "/v1/pending?limit=2")
        everything = (await c.get("/v1/agents")).json()
        bad = await c.get("/v1/agents?limit=0")
    assert [[a["name"] for a in page] for page in agents] == [
        ["a0", "a1", "a2"],
        ["a3", "a4", "a5"],
        ["a6"],
    ]
    assert [[w["agent"] for w in page] for page in waits] == [["a1", "a2"], ["a5"]]
    assert [a["name"] for a in everything] == names
    assert bad.status_code == 400


async def test_a_page_reads_only_its_agents(store: Store) -> None:
    await apply(store, *(agent_doc(f"a{i:02}", ECHO) for i in range(30)))
    async with http(store) as c:
        await c.get("/v1/agents?limit=2")  # the name index, read once per fleet change
        before = await store.command_calls()
        r = await c.get("/v1/agents?limit=2&cursor=a10")
        after = await store.command_calls()
    used = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert [a["name"] for a in r.json()] == ["a11", "a12"]
    assert used.get("hgetall", 0) <= 2, used  # two status hashes, never the fleet's specs
    assert used.get("hmget", 0) <= 1, used


# ---------------------------------------------------------------------- the daemon


@pytest.mark.e2e
async def test_the_daemon_refuses_rebinding_and_logs_a_hang_up_once(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    port = free_port()
    log = tmp_path / "d.log"
    with spawn(env, log, "daemon", "--http", f"127.0.0.1:{port}") as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:

            async def up() -> bool:
                try:
                    return (await c.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, within=20, what="the HTTP ingress")
            rebound = await c.get("/v1/agents", headers={"Host": f"evil.example:{port}"})
            assert rebound.status_code == 403
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                f"POST /v1/agents/echo/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Length: 1000\r\n\r\nhalf a mess".encode()
            )

        def hung_up() -> bool:
            return "hung up" in log.read_text()

        await wait_until(hung_up, within=10, what="the hang-up's log line")
        proc.terminate()
        assert await exited(proc, within=15) == 0, log.read_text()
    text = log.read_text()
    assert text.count("hung up") == 1, text
    assert "Traceback" not in text, text
    assert await store.inbox.depth("echo") == 0
