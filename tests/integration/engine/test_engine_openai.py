"""The openai engine against a real OpenAI-compatible HTTP server on loopback.

Append-only prompts, replica affinity, 429 throttles shared by every agent of the model
(and, through Redis, by every daemon), connection errors and garbage as infrastructure
faults, history-only hibernation, and in a daemon: an agent whose model is down has its
task retried, never crashed.
"""

from __future__ import annotations

import socket

import anyio
import msgspec
import pytest

from agentos.engine import EngineError, EngineUnavailable
from agentos.engine.openai import OpenAIEngine
from agentos.engine.remote import ModelThrottled
from agentos.runtime.models import StoreThrottleBoard
from agentos.store import Store
from tests.fixture_agents import EchoState
from tests.helpers import agent_doc, apply, policy_doc, running_daemon, status_is, wait_until
from tests.openai_server import openai_server

pytestmark = pytest.mark.anyio


def _engine(*urls: str, **options: object) -> OpenAIEngine:
    return OpenAIEngine(model="big", endpoints=list(urls), **options)  # type: ignore[arg-type]


async def test_a_conversation_is_append_only_and_reports_cached_tokens() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        first = await engine.generate("a", "Hello there, how are you today?", max_tokens=5)
        second = await engine.generate("a", "And tomorrow?", max_tokens=5)
        await engine.aclose()
    one, two = server.behaviour.requests
    assert one["messages"] == [{"role": "user", "content": "Hello there, how are you today?"}]
    assert two["messages"][: len(one["messages"])] == one["messages"]  # only appended
    assert two["messages"][1] == {"role": "assistant", "content": first.text}
    assert first.cached_tokens == 0
    assert second.cached_tokens > 0
    assert (
        second.input_tokens + second.cached_tokens
        == len("".join(f"{m['role']}:{m['content']}\n" for m in two["messages"])) // 4
    )


async def test_completions_api_and_streaming_send_the_whole_text() -> None:
    with openai_server() as server:
        engine = _engine(server.url, api="completions")
        engine.open_session("a")
        await engine.generate("a", "Q: one?\nA:", max_tokens=3)
        pieces = [c.text async for c in engine.stream("a", "\nQ: two?\nA:", max_tokens=3)]
        await engine.aclose()
    first, second = server.behaviour.requests
    assert second["prompt"].startswith(first["prompt"])
    assert second["stream"] is True
    assert "".join(pieces) == " reply 2"


async def test_an_agent_stays_on_its_replica_and_moves_when_it_is_down() -> None:
    with openai_server() as a, openai_server() as b, openai_server() as c:
        servers = {s.url: s for s in (a, b, c)}
        engine = _engine(*servers, attempts=1)
        names = [f"agent-{i}" for i in range(12)]
        for name in names:
            engine.open_session(name)
            for _ in range(2):
                await engine.generate(name, f"hi from {name}", max_tokens=2)
        seen: dict[str, set[str]] = {n: set() for n in names}
        for url, server in servers.items():
            for request in server.behaviour.requests:
                seen[request["user"]].add(url)
        assert all(len(urls) == 1 for urls in seen.values()), seen
        assert len({next(iter(u)) for u in seen.values()}) > 1  # agents spread over replicas
        victim = names[0]
        home = next(iter(seen[victim]))
        servers[home].stop()
        reply = await engine.generate(victim, "still there?", max_tokens=2)
        assert reply.text
        moved = [
            u
            for u, s in servers.items()
            if u != home and any(r["user"] == victim for r in s.behaviour.requests)
        ]
        assert moved == [engine.client.order(victim)[1].url]
        await engine.aclose()


async def test_a_429_throttles_every_agent_of_the_model_and_every_daemon(store: Store) -> None:
    with openai_server() as server:
        board = StoreThrottleBoard(store)
        one = _engine(server.url, throttle_wait_s=0.0, attempts=1, throttle_board=board)
        other_daemon = _engine(server.url, throttle_wait_s=0.0, attempts=1, throttle_board=board)
        for name in ("a", "b"):
            one.open_session(name)
        other_daemon.open_session("c")
        server.behaviour.mode = "throttle"
        server.behaviour.retry_after = "30"
        with pytest.raises(ModelThrottled) as caught:
            await one.generate("a", "first", max_tokens=2)
        assert caught.value.retry_after_s > 25
        assert isinstance(caught.value, EngineUnavailable)  # infrastructure, not the agent's
        calls = len(server.behaviour.requests)
        with pytest.raises(ModelThrottled):
            await one.generate("b", "another agent", max_tokens=2)
        with pytest.raises(ModelThrottled):
            await other_daemon.generate("c", "another daemon", max_tokens=2)
        assert len(server.behaviour.requests) == calls  # nobody asked the provider again
        assert await store.models.throttled_until("big") > 0
        await one.aclose()
        await other_daemon.aclose()


async def test_a_short_retry_after_is_waited_out_within_the_call() -> None:
    with openai_server() as server:
        engine = _engine(server.url, throttle_wait_s=5.0)
        engine.open_session("a")
        server.behaviour.mode = "throttle"
        server.behaviour.retry_after = "0.3"

        async def recover() -> None:
            # Once the call has been throttled, within its Retry-After wait.
            await wait_until(lambda: server.behaviour.requests, what="a throttled request")
            server.behaviour.mode = "ok"

        async with anyio.create_task_group() as tg:
            tg.start_soon(recover)
            reply = await engine.generate("a", "hello", max_tokens=2)
        assert reply.text
        assert len(server.behaviour.requests) == 2  # throttled once, then answered
        await engine.aclose()


@pytest.mark.parametrize("mode", ["error", "garbage", "drop"])
async def test_faulty_servers_are_infrastructure_errors(mode: str) -> None:
    with openai_server() as server:
        engine = _engine(server.url, attempts=2)
        engine.open_session("a")
        server.behaviour.mode = mode
        with pytest.raises(EngineUnavailable):
            await engine.generate("a", "hello", max_tokens=2)
        assert len(server.behaviour.requests) == 2  # retried
        assert not engine.client.replicas[0].healthy
        await engine.aclose()


async def test_a_refused_request_is_the_callers_error() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        with pytest.raises(EngineError, match="GBNF"):
            await engine.generate("a", "x", grammar="root ::= [a-z]")
        await engine.aclose()


async def test_hibernation_keeps_the_conversation_and_wake_resends_it() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        await engine.generate("a", "remember blue", max_tokens=2)
        snapshot = await engine.export_kv("a")
        assert snapshot.data is None
        assert snapshot.tokens == ()  # the messages are in the conversation, not as "tokens"
        engine.close_session("a")
        woken = _engine(server.url)  # another daemon
        woken.open_session("a")
        assert await woken.import_kv("a", snapshot) is False  # no KV: history only
        await woken.prefill("a", snapshot.tokens, snapshot.conversation)
        await woken.generate("a", "what colour?", max_tokens=2)
        last = server.behaviour.requests[-1]["messages"]
        assert last[0] == {"role": "user", "content": "remember blue"}
        assert last[-1] == {"role": "user", "content": "what colour?"}
        await engine.aclose()
        await woken.aclose()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_agent_whose_model_is_down_is_retried_not_crashed(store: Store) -> None:
    port = _dead_port()
    model = policy_doc(
        {
            "apiVersion": "agentos/v1",
            "kind": "Model",
            "metadata": {"name": "remote"},
            "spec": {
                "engine": "openai",
                "endpoints": [{"url": f"http://127.0.0.1:{port}/v1"}],
                "credentials": {"apiKey": {"env": "AGENTOS_TEST_KEY"}},
            },
        }
    )
    agent = agent_doc(
        "echo",
        "tests.fixture_agents:Echo",
        model="remote",
        config={"llm": True},
        triggers=[{"inbox": {}}],
    )
    await apply(store, model, agent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENTOS_TEST_KEY", "sk-secret-value")
        async with running_daemon(store):
            await store.inbox.send("echo", "hello")
            await wait_until(
                lambda: _has_event(store, "echo", "InfrastructureError"),
                within=20,
                what="an infrastructure error",
            )
            with openai_server(port) as server:
                await wait_until(lambda: status_is(store, "echo", tasks_succeeded="1"), within=40)
            status = await store.agents.status("echo")
        assert server.behaviour.authorization[-1] == "Bearer sk-secret-value"
    assert status.get("restarts", "0") == "0"
    raw = await store.agents.load_state("echo")
    assert raw is not None
    assert msgspec.json.decode(raw, type=EchoState).replies == [" reply 1"]
    text = " ".join(f"{e.type} {e.message}" for e in await store.events.read("echo"))
    assert "sk-secret-value" not in text
    assert "sk-secret-value" not in str(await store.models.read())


async def _has_event(store: Store, name: str, kind: str) -> bool:
    return any(e.type == kind for e in await store.events.read(name))
