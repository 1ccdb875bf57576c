"""A Model that is wrong (key refused, no such model, cannot start) parks its agents' work,
says why where an operator looks, is rebuilt without a daemon restart once fixed, and
never gets a key a provider echoes back stored or logged."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agentos.client import Client
from agentos.engine.base import EngineUnavailable, ModelMisconfigured
from agentos.engine.openai import OpenAIEngine
from agentos.engine.remote import RequestRefused, scrub
from agentos.store import Store
from tests.cli_support import cli, show
from tests.helpers import agent_doc, apply, policy_doc, running_daemon, status_is, wait_until

pytestmark = pytest.mark.anyio

WRONG = "sk-wrong-Zq8vX1c9TOPSECRET"
RIGHT = "sk-right-Hh3kP0w7ALSOSECRET"


@dataclass
class Upstream:
    """What the loopback server accepts; it records the keys it was shown."""

    key: str = RIGHT
    model: str = "good"
    status: int = 0  # answer every request with this status (0: as the key and model say)
    body: str = ""
    seen: list[str] = field(default_factory=list)


def _handler(up: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict[str, Any] | str) -> None:
            raw = payload if isinstance(payload, str) else json.dumps(payload)
            data = raw.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            presented = self.headers.get("Authorization", "").removeprefix("Bearer ")
            up.seen.append(presented)
            if up.status:
                self._send(up.status, up.body)
                return
            if presented != up.key:  # echoes the key, as some providers do
                message = f"Incorrect API key provided: {presented}"
                self._send(401, {"error": {"message": message, "code": "invalid_api_key"}})
                return
            if body.get("model") != up.model:
                message = f"The model `{body.get('model')}` does not exist"
                self._send(404, {"error": {"message": message, "code": "model_not_found"}})
                return
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                events = [
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                    {"choices": [], "usage": usage},
                ]
                for event in events:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                return
            message = {"role": "assistant", "content": "ok"}
            choice = {"index": 0, "message": message, "text": "ok", "finish_reason": "stop"}
            self._send(200, {"choices": [choice], "usage": usage})

    return Handler


@contextmanager
def upstream() -> Iterator[tuple[str, Upstream]]:
    """A loopback OpenAI-compatible server; yields its base URL (ending in /v1)."""
    up = Upstream()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(up))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", up
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _model(name: str, url: str, credentials: dict[str, Any], served: str = "good") -> Any:
    return policy_doc(
        {
            "apiVersion": "agentos/v1",
            "kind": "Model",
            "metadata": {"name": name},
            "spec": {
                "engine": "openai",
                "servedModel": served,
                "endpoints": [{"url": url}],
                "credentials": {"apiKey": credentials},
            },
        }
    )


async def _everything_in_redis(store: Store) -> bytes:
    """Every key of the test's Redis and its value, whatever its type, as one blob."""
    r = store.conn.r
    out = []
    async for key in r.scan_iter(count=500):
        kind = await r.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "string":
            value: Any = await r.get(key)
        elif kind == "hash":
            value = await r.hgetall(key)
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        elif kind == "set":
            value = await r.smembers(key)
        elif kind == "zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await r.xrange(key)
        else:
            value = kind
        out.append(repr((key, value)).encode())
    return b"\n".join(out)


# ---------------------------------------------------------------------- the engine


@pytest.mark.parametrize(
    ("status", "body", "misconfigured"),
    [
        (401, '{"error": {"message": "Incorrect API key provided: %s"}}', True),
        (403, '{"error": "forbidden for %s"}', True),
        (404, '{"error": "Not Found"}', True),
        (400, '{"error": {"message": "model \\"x\\" not found, try pulling it first"}}', True),
        (400, '{"error": {"code": "model_not_found", "message": "key %s"}}', True),
        (400, '{"error": {"message": "temperature must be below 2"}}', False),
    ],
)
async def test_a_model_server_that_refuses_the_model_raises_model_misconfigured(
    status: int, body: str, misconfigured: bool
) -> None:
    with upstream() as (url, up):
        up.status = status
        up.body = body.replace("%s", WRONG) if "%s" in body else body
        engine = OpenAIEngine(model="good", endpoints=[{"url": url}], api_key=WRONG)
        engine.open_session("a")
        try:
            with pytest.raises(EngineUnavailable if misconfigured else RequestRefused) as caught:
                await engine.generate("a", "hello", max_tokens=4)
        finally:
            await engine.aclose()
    error = caught.value
    assert isinstance(error, ModelMisconfigured) is misconfigured
    assert WRONG not in str(error)
    if misconfigured:
        assert isinstance(error, ModelMisconfigured)
        assert str(error).startswith(f"model good misconfigured: HTTP {status} on POST ")
        assert error.model == "good"
    assert len(up.seen) == 1  # not retried: every replica would answer the same


def test_scrub_removes_resolved_secrets_bearer_tokens_and_control_characters() -> None:
    text = f"bad key {WRONG}; header Authorization: Bearer sk-other-123\x1b[31m red"
    cleaned = scrub(text, (WRONG,))
    assert WRONG not in cleaned
    assert "sk-other-123" not in cleaned
    assert "\x1b" not in cleaned
    assert "bad key ***" in cleaned
    assert "Bearer ***" in cleaned


# ---------------------------------------------------------------------- the fleet


async def test_a_refused_key_parks_the_agent_says_why_and_a_fixed_key_file_resumes_it(
    store: Store,
    tmp_path: Path,
    env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    key_file = tmp_path / "key"
    key_file.write_text(WRONG + "\n")
    with upstream() as (url, up):
        await apply(
            store,
            _model("remote", url, {"file": str(key_file)}),
            agent_doc("asker", "tests.fixture_agents:Echo", model="remote", config={"llm": True}),
        )
        async with running_daemon(store) as daemon:
            await store.inbox.send("asker", "hello")

            async def parked() -> list[dict[str, str]]:
                tasks = await store.tasks.recent("asker", count=5)
                return [t for t in tasks if t.get("status") in ("parked", "retrying")]

            (task,) = await wait_until(parked, within=15, what="the task parked")
            assert "model remote misconfigured: HTTP 401" in task["error"]
            status = await store.agents.status("asker")
            assert status.get("phase") != "Failed"
            assert "model remote misconfigured: HTTP 401" in status.get("message", "")
            events = [e.message for e in await store.events.read("asker")]
            assert any("model remote misconfigured: HTTP 401" in m for m in events), events
            condition = daemon.models.describe()["remote"]["condition"]
            assert condition["type"] == "ModelMisconfigured"
            assert "HTTP 401" in condition["reason"]
            assert condition["since"] > 0

            # Where an operator looks: ps, describe agent, events NAME.
            ps = await cli(env, "ps")
            assert "asker" in ps.stdout, show(ps)
            assert "Failed" not in ps.stdout, show(ps)
            described = await cli(env, "describe", "agent", "asker")
            assert "misconfigured: HTTP 401" in described.stdout, show(described)
            shown = await cli(env, "events", "asker")
            assert "misconfigured: HTTP 401" in shown.stdout, show(shown)
            for proc in (ps, described, shown):
                assert WRONG not in proc.stdout + proc.stderr

            # The key the provider echoed is stored nowhere and logged nowhere.
            assert WRONG in up.seen  # it was sent, and echoed back
            assert WRONG.encode() not in await _everything_in_redis(store)
            assert WRONG not in caplog.text

            # Fix the key file: the engine is rebuilt and the parked task runs.
            key_file.write_text(RIGHT + "\n")
            await wait_until(
                lambda: status_is(store, "asker", tasks_succeeded="1"),
                within=30,
                what="the task to succeed with the fixed key",
            )
            assert RIGHT in up.seen
            assert daemon.models.describe()["remote"]["condition"] is None
            status = await store.agents.status("asker")
            assert status.get("restarts", "0") == "0", status  # never a crash
        stored = await _everything_in_redis(store)
    assert WRONG.encode() not in stored
    assert RIGHT.encode() not in stored
    assert WRONG not in caplog.text
    assert RIGHT not in caplog.text


async def test_a_wrong_model_name_parks_the_agent_and_re_applying_the_model_resumes_it(
    store: Store, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(RIGHT)
    with upstream() as (url, _up):
        await apply(
            store,
            _model("remote", url, {"file": str(key_file)}, served="no-such-model"),
            agent_doc("asker", "tests.fixture_agents:Echo", model="remote", config={"llm": True}),
        )
        async with running_daemon(store) as daemon:
            await store.inbox.send("asker", "hello")

            async def parked() -> list[dict[str, str]]:
                tasks = await store.tasks.recent("asker", count=5)
                return [t for t in tasks if t.get("status") in ("parked", "retrying")]

            (task,) = await wait_until(parked, within=15, what="the task parked")
            assert "model remote misconfigured: HTTP 404" in task["error"]
            assert "does not exist" in task["error"]
            assert (await store.agents.status("asker")).get("phase") != "Failed"

            await apply(store, _model("remote", url, {"file": str(key_file)}, served="good"))
            await wait_until(
                lambda: status_is(store, "asker", tasks_succeeded="1"),
                within=30,
                what="the task to succeed once the Model names the right model",
            )
            assert daemon.models.describe()["remote"]["condition"] is None
            assert (await store.agents.status("asker")).get("restarts", "0") == "0"


async def test_a_model_that_cannot_start_parks_its_agents_with_the_reason_and_starts_once_fixed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTOS_TEST_UNSET_KEY", raising=False)
    with upstream() as (url, _):
        await apply(
            store,
            _model("keyless", url, {"env": "AGENTOS_TEST_UNSET_KEY"}),
            agent_doc("asker", "tests.fixture_agents:Echo", model="keyless", config={"llm": True}),
        )
        async with running_daemon(store) as daemon:
            await store.inbox.send("asker", "hello")

            async def parked() -> list[dict[str, str]]:
                tasks = await store.tasks.recent("asker", count=5)
                return [t for t in tasks if t.get("status") in ("parked", "retrying")]

            (task,) = await wait_until(parked, within=15, what="the task parked")
            assert "model keyless misconfigured" in task["error"]
            assert "AGENTOS_TEST_UNSET_KEY" in task["error"]
            status = await store.agents.status("asker")
            assert status.get("phase") not in ("Pending", "Failed"), status
            assert "AGENTOS_TEST_UNSET_KEY" in status.get("message", "")
            described = await Client(store).describe("asker")
            assert any("AGENTOS_TEST_UNSET_KEY" in e.message for e in described.events)
            condition = daemon.models.describe()["keyless"]["condition"]
            assert condition["type"] == "ModelMisconfigured"

            monkeypatch.setenv("AGENTOS_TEST_UNSET_KEY", RIGHT)
            await wait_until(
                lambda: status_is(store, "asker", tasks_succeeded="1"),
                within=30,
                what="the task to succeed once the variable is set",
            )
            assert daemon.models.describe()["keyless"]["condition"] is None
