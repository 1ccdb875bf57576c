"""The HTTP ingress: webhooks in, health out, with auth and limits, against a real Redis."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from agentos.client import Client
from agentos.ingress import build_app, is_loopback
from agentos.store import Store
from tests.cli_support import base_env, cli, exited, spawn
from tests.helpers import agent_doc, apply, wait_until

pytestmark = pytest.mark.anyio

ECHO = "tests.fixture_agents:Echo"


def http(
    store: Store, *, token: str | None = None, ready: bool = True, stopping: bool = False
) -> httpx.AsyncClient:
    app = build_app(Client(store), token=token, ready=lambda: ready, stopping=lambda: stopping)
    # Without a token only localhost names are served (DNS rebinding).
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


async def test_a_webhook_puts_a_message_in_the_inbox(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    async with http(store) as c:
        r = await c.post(
            "/v1/agents/echo/messages", content="deploy done", headers={"Idempotency-Key": "d-1"}
        )
    assert r.status_code == 202
    body = r.json()
    assert body["taskId"] == f"m-{body['messageId']}"
    (msg,) = await store.inbox.read("echo", "reader", count=10) if await _group(store) else []
    assert (msg.body, msg.key) == ("deploy done", "d-1")


async def _group(store: Store) -> bool:
    await store.inbox.ensure("echo")
    return True


@pytest.mark.parametrize(
    ("path", "content", "status", "code"),
    [
        ("/v1/agents/nobody/messages", b"hi", 404, "not_found"),
        ("/v1/agents/echo/messages", b"x" * 65, 413, "too_large"),
        ("/v1/agents/echo/messages", b"\xff\xfe bad", 400, "bad_encoding"),
    ],
)
async def test_bad_requests_get_a_json_error_and_enqueue_nothing(
    store: Store, path: str, content: bytes, status: int, code: str
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {"maxMessageBytes": 64}}]))
    before = await store.namespace_keys()
    async with http(store) as c:
        r = await c.post(path, content=content)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert await store.namespace_keys() == before


async def test_bearer_token_is_required_when_configured(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO))
    async with http(store, token="s3cret") as c:
        missing = await c.get("/v1/agents")
        wrong = await c.get("/v1/agents", headers={"Authorization": "Bearer nope"})
        right = await c.get("/v1/agents", headers={"Authorization": "Bearer s3cret"})
        health = await c.get("/healthz")  # probes need no token
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert "s3cret" not in missing.text
    assert [a["name"] for a in right.json()] == ["echo"]
    assert health.json() == {"status": "ok"}


async def test_reads_probes_and_unknown_routes(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO))
    async with http(store, ready=False) as c:
        detail = await c.get("/v1/agents/echo")
        starting = await c.get("/readyz")
        missing = await c.get("/v1/nothing")
        wrong_method = await c.delete("/v1/agents")
    assert detail.json()["spec"]["metadata"]["name"] == "echo"
    assert starting.status_code == 503
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    async with http(store, ready=True) as c:
        assert (await c.get("/readyz")).json() == {"status": "ready"}
    async with http(store, ready=True, stopping=True) as c:  # draining: out of rotation
        draining = await c.get("/readyz")
        assert (await c.get("/healthz")).status_code == 200  # but alive: not restarted
    assert draining.status_code == 503
    assert draining.json()["error"]["code"] == "stopping"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
async def test_the_daemon_serves_webhooks_end_to_end(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    exposed = await cli(env, "daemon", "--http", "0.0.0.0:9")
    assert exposed.returncode == 2
    assert "bearer token is required" in exposed.stderr
    port = _free_port()
    with spawn(env, tmp_path / "d.log", "daemon", "--http", f"127.0.0.1:{port}") as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:

            async def up() -> bool:
                try:
                    return (await c.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, within=20, what="the HTTP ingress")
            r = await c.post("/v1/agents/echo/messages", content="from a webhook")
            assert r.status_code == 202
            task_id = r.json()["taskId"]
        record = await Client(store).wait_task("echo", task_id, timeout_s=20)
        assert record["status"] == "succeeded"
        proc.terminate()
        assert await exited(proc, within=15) == 0, (tmp_path / "d.log").read_text()
