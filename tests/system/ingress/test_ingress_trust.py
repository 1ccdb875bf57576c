"""The HTTP ingress refuses what it cannot trust (issue 22, item 5), against a real Redis.

Cross-site and DNS-rebinding requests on a token-less loopback server, bodies of the
wrong type, too large, stalled, cut off or nested too deep, control characters in text
that reaches events, reused idempotency keys, and list endpoints that page. Most tests
drive the ASGI app directly, some with a hand-made ``receive`` to play a client no
HTTP library plays (one that stalls, or hangs up mid-body); one runs the daemon.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from agentos.client import Client
from agentos.ingress import build_app, parse_json, refusal
from agentos.store import Store
from tests.helpers import agent_doc, apply
from tests.ingress_support import ECHO, JSON, http, park

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------- Host and Origin

LOCAL = ("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("headers", "bind", "token", "refused"),
    [
        ({"host": "127.0.0.1:8080"}, LOCAL, False, False),
        ({"host": "localhost:8080"}, LOCAL, False, False),
        ({"host": "LOCALHOST:8080"}, LOCAL, False, False),
        ({"host": "[::1]:8080"}, LOCAL, False, False),
        ({"host": "[::1]:8080"}, ("::1", 8080), False, False),
        ({"host": "127.0.0.1:9090"}, LOCAL, False, True),  # another port: not this server
        ({"host": "127.0.0.1"}, LOCAL, False, True),
        ({"host": "attacker.example:8080"}, LOCAL, False, True),  # DNS rebinding
        ({"host": ""}, LOCAL, False, True),
        ({"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:8080"}, LOCAL, False, False),
        ({"host": "127.0.0.1:8080", "origin": "http://localhost:8080"}, LOCAL, False, False),
        ({"host": "127.0.0.1:8080", "origin": "https://evil.example"}, LOCAL, False, True),
        ({"host": "127.0.0.1:8080", "origin": "null"}, LOCAL, False, True),
        ({"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:1234"}, LOCAL, False, True),
        ({"host": "127.0.0.1:8080", "sec-fetch-site": "cross-site"}, LOCAL, False, True),
        ({"host": "127.0.0.1:8080", "sec-fetch-site": "same-site"}, LOCAL, False, True),
        ({"host": "127.0.0.1:8080", "sec-fetch-site": "same-origin"}, LOCAL, False, False),
        ({"host": "127.0.0.1:8080", "sec-fetch-site": "none"}, LOCAL, False, False),
        ({"host": "localhost:5555"}, None, False, False),  # bind unknown: any port
        ({"host": "agentos.example"}, None, False, True),
        # With a token any Host is served (a proxy, a pod IP); the Origin must be it.
        ({"host": "agentos.example"}, ("0.0.0.0", 80), True, False),
        ({"host": "h.example", "origin": "https://h.example"}, None, True, False),
        ({"host": "h.example", "origin": "https://evil.example"}, None, True, True),
        ({"host": "h.example", "sec-fetch-site": "cross-site"}, None, True, True),
    ],
)
def test_who_is_refused(
    headers: dict[str, str], bind: tuple[str, int] | None, token: bool, refused: bool
) -> None:
    assert (refusal(headers, bind=bind, token=token) is not None) is refused


async def test_a_cross_site_or_rebound_request_is_refused_before_anything_happens(
    store: Store,
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    await park(store, "echo")
    before = await store.namespace_keys()
    async with http(store) as c:
        rebound = await c.get("/v1/pending", headers={"Host": "attacker.example:8080"})
        posted = await c.post(
            "/v1/agents/echo/messages",
            content="rm -rf",
            headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        )
        fetched = await c.post(
            "/v1/agents/echo/tasks/m-1-0/answer",
            json={"yes": True},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        unknown = await c.get("/nothing", headers={"Host": "attacker.example:8080"})
        ok = await c.get("/v1/pending")
    for r in (rebound, posted, fetched, unknown):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
    assert "deploy?" not in rebound.text
    assert await store.namespace_keys() == before
    assert await store.inbox.depth("echo") == 0
    assert (await store.waits.get("echo")).answer is None  # type: ignore[union-attr]
    assert [w["task"] for w in ok.json()] == ["m-1-0"]


async def test_with_a_token_any_host_is_served_but_not_another_origin(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO))
    auth = {"Authorization": "Bearer s3cret"}
    async with http(store, token="s3cret", base_url="http://agentos.internal") as c:
        ok = await c.get("/v1/agents", headers=auth)
        other = await c.get("/v1/agents", headers={**auth, "Origin": "https://evil.example"})
    assert ok.status_code == 200
    assert other.status_code == 403


# ---------------------------------------------------------------------- content types


async def test_answers_and_events_take_json_only_messages_any_text(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    await park(store, "echo")
    async with http(store) as c:
        form = await c.post(  # what `curl -d` and a cross-site <form> send
            "/v1/agents/echo/tasks/m-1-0/answer",
            content=b'{"yes": true}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        plain = await c.post(
            "/v1/agents/echo/events/go", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        bare = await c.post("/v1/agents/echo/events/go", content=b"{}")
        message = await c.post(
            "/v1/agents/echo/messages", content="deploy", headers={"Content-Type": "text/plain"}
        )
    for r in (form, plain, bare):
        assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert (await store.waits.get("echo")).answer is None  # type: ignore[union-attr]
    assert message.status_code == 202


# ---------------------------------------------------------------------- body limits

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def call(
    app: Any, path: str, receive: Receive, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """One request through the ASGI app with a hand-made ``receive``: status and JSON."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body) if body else {}


def chunks(*parts: bytes, then: str = "end") -> tuple[Receive, list[int]]:
    """A ``receive`` that hands out ``parts`` one by one, then ends the body, stalls
    (``then="stall"``) or reports a hang-up (``then="disconnect"``); and how many times
    it was called."""
    calls = [0]

    async def receive() -> dict[str, Any]:
        calls[0] += 1
        if calls[0] <= len(parts):
            return {"type": "http.request", "body": parts[calls[0] - 1], "more_body": True}
        if then == "stall":
            await anyio.sleep_forever()
        if then == "disconnect":
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive, calls


def app_of(store: Store, **options: Any) -> Any:
    return build_app(
        Client(store), token=None, ready=lambda: True, bind=("127.0.0.1", 8080), **options
    )


HOST = {"Host": "127.0.0.1:8080"}


async def test_a_declared_length_over_the_agents_limit_is_refused_unread(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {"maxMessageBytes": 100}}]))
    receive, calls = chunks(b"x" * 1000)
    status, body = await call(
        app_of(store),
        "/v1/agents/echo/messages",
        receive,
        {**HOST, "Content-Length": "1000", "Content-Type": "text/plain"},
    )
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert calls[0] == 0  # not one byte read
    assert await store.inbox.depth("echo") == 0


async def test_a_chunked_body_is_read_only_up_to_the_cap(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {"maxMessageBytes": 100}}]))
    receive, calls = chunks(*[b"x" * 60] * 1000)  # 60 KB, no Content-Length
    status, body = await call(app_of(store), "/v1/agents/echo/messages", receive, HOST)
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert calls[0] == 2  # 120 bytes: past the cap, and no further
    receive, calls = chunks(*[b"[" * 60] * 1000)
    status, body = await call(
        app_of(store, max_json_bytes=1000),
        "/v1/agents/echo/events/go",
        receive,
        {**HOST, "Content-Type": "application/json"},
    )
    assert status == 413
    assert calls[0] == 17


async def test_a_message_may_be_as_large_as_its_agent_accepts(store: Store) -> None:
    big = 2 * 1024 * 1024
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {"maxMessageBytes": big}}]))
    async with http(store) as c:
        fits = await c.post("/v1/agents/echo/messages", content=b"y" * (big - 1))
        over = await c.post("/v1/agents/echo/messages", content=b"y" * (big + 1))
    assert fits.status_code == 202, fits.text
    assert over.status_code == 413
    assert await store.inbox.depth("echo") == 1


async def test_a_stalled_body_times_out(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    receive, _ = chunks(b"half a mess", then="stall")
    with anyio.fail_after(10):
        status, body = await call(
            app_of(store, read_idle_s=0.2), "/v1/agents/echo/messages", receive, HOST
        )
    assert (status, body["error"]["code"]) == (408, "timeout")
    receive, _ = chunks(*[b" "] * 100_000, then="stall")  # a trickle never stalls
    with anyio.fail_after(10):
        status, body = await call(
            app_of(store, read_total_s=0.3),
            "/v1/agents/echo/messages",
            receive,
            HOST,
        )
    assert status in (408, 413)  # whichever comes first; never a hang
    assert await store.inbox.depth("echo") == 0


async def test_a_client_that_hangs_up_mid_body_is_one_quiet_line(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    receive, _ = chunks(b"half a mess", then="disconnect")
    caplog.set_level(logging.DEBUG)
    await call(app_of(store), "/v1/agents/echo/messages", receive, HOST)  # does not raise
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.name for r in records] == ["agentos.ingress"], [r.getMessage() for r in records]
    assert records[0].exc_info is None
    assert "hung up" in records[0].getMessage()
    assert await store.inbox.depth("echo") == 0


# ---------------------------------------------------------------------- JSON and text


@pytest.mark.parametrize("depth", [33, 100_000])
async def test_deeply_nested_json_is_a_400_not_a_crash(store: Store, depth: int) -> None:
    await apply(store, agent_doc("echo", ECHO))
    await park(store, "echo")
    nested = b"[" * depth + b"]" * depth
    async with http(store, max_json_bytes=1_000_000) as c:
        event = await c.post("/v1/agents/echo/events/go", content=nested, headers=JSON)
        answer = await c.post("/v1/agents/echo/tasks/m-1-0/answer", content=nested, headers=JSON)
    for r in (event, answer):
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_json"), r.text
    assert (await store.waits.get("echo")).answer is None  # type: ignore[union-attr]


def test_parse_json_bounds_depth() -> None:
    assert parse_json(b"[" * 32 + b"]" * 32) == eval("[" * 32 + "]" * 32)
    assert parse_json(b"") is None
    for bad in (b"[" * 33 + b"]" * 33, b'{"a":' * 40 + b"1" + b"}" * 40):
        with pytest.raises(ValueError, match="nested deeper than 32 levels"):
            parse_json(bad)
    with pytest.raises(ValueError, match="Expecting"):
        parse_json(b"{")
    with pytest.raises(ValueError, match="UTF-8"):
        parse_json(b"\xff")


@pytest.mark.parametrize("who", ["eve\n12:00:00 deployer: Answered (ask) forged", "\x1b[2Jeve"])
async def test_a_by_with_control_characters_is_refused(store: Store, who: str) -> None:
    await apply(store, agent_doc("echo", ECHO))
    await park(store, "echo")
    async with http(store) as c:
        r = await c.post("/v1/agents/echo/tasks/m-1-0/answer", json={"yes": True, "by": who})
        named = await c.post("/v1/agents/echo/events/go%0Aforged", json={})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_text")
    assert (named.status_code, named.json()["error"]["code"]) == (400, "bad_text")
    assert (await store.waits.get("echo")).answer is None  # type: ignore[union-attr]
    assert [e for e in await store.events.read("echo") if e.type == "Answered"] == []
