"""kind: Model — validation at the edge, checks at apply, routing, fallback, usage by model, CLI."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from agentos.client import Client
from agentos.core.modelspec import ModelPrices, ModelResource
from agentos.core.modelusage import by_model, model_usage
from agentos.core.routing import ring_order
from agentos.core.spec import SpecError, load_paths, parse_text
from agentos.store import Store
from tests.cli_support import cli, show
from tests.fixture_agents import EchoState
from tests.helpers import agent_doc, apply, policy_doc, running_daemon, status_is, wait_until
from tests.openai_server import openai_server

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "models" / "two-models.yaml"


def _model(name: str = "big", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "agentos/v1", "kind": "Model", "metadata": {"name": name}, "spec": spec}


def _issues(body: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_text(yaml.safe_dump(body, sort_keys=False), source="m.yaml")
    return [str(i) for i in caught.value.issues]


@pytest.mark.parametrize(
    ("spec", "where", "message"),
    [
        ({"engine": "openai"}, "spec.endpoints", "needs at least one endpoint"),
        ({"engine": "vllm"}, "spec.engine", "expected one of: llama, llamaserver, openai, sim"),
        (
            {"engine": "openai", "endpoints": [{"url": "http://h/v1"}], "prices": {"input": -1}},
            "spec.prices.input",
            "greater than or equal to 0",
        ),
        (
            {
                "engine": "openai",
                "endpoints": [{"url": "http://h/v1"}],
                "credentials": {"apiKey": "sk-inline-secret"},
            },
            "spec.credentials.apiKey",
            "by reference only",
        ),
        (
            {"engine": "openai", "endpoints": [{"url": "https://me:pw@h/v1"}]},
            "spec.endpoints[0].url",
            "carries a user or password",
        ),
        (
            {"engine": "openai", "endpoints": [{"url": "https://h/v1?api_key=abc"}]},
            "spec.endpoints[0].url",
            "looks like a secret",
        ),
        (
            {"engine": "openai", "endpoints": [{"url": "ftp://h"}]},
            "spec.endpoints[0].url",
            "http:// or https://",
        ),
        ({"engine": "sim", "endpoints": [{"url": "http://h"}]}, "spec.endpoints", "no endpoints"),
        ({"engine": "sim", "fallback": "big"}, "spec.fallback", "its own fallback"),
        (
            {"engine": "openai", "endpoints": [{"url": "http://h"}], "credentials": {"apiKey": {}}},
            "spec.credentials.apiKey",
            "exactly one of: env, file",
        ),
    ],
)
def test_bad_models_are_refused_with_line_and_field(
    spec: dict[str, Any], where: str, message: str
) -> None:
    issues = _issues(_model(**spec))
    assert any("m.yaml:" in i and f": {where}: " in i and message in i for i in issues), issues
    assert all("sk-inline-secret" not in i and "pw@" not in i for i in issues)


def test_default_is_reserved() -> None:
    (issue,) = _issues(_model("default", engine="sim"))
    assert "metadata.name" in issue


def test_a_good_model_reads_back_unchanged() -> None:
    body = _model(
        engine="openai",
        endpoints=[{"url": "https://api.example.com/v1/", "maxConcurrent": 8}],
        credentials={"apiKey": {"env": "OPENAI_API_KEY"}},
        prices={"input": 0.15, "cachedInput": 0.075, "output": 0.6},
        fallback="small",
        timeouts={"request": "30s", "throttleWait": "0s"},
    )
    (doc,) = parse_text(json.dumps(body))
    assert isinstance(doc.resource, ModelResource)
    assert doc.resource.spec.endpoints[0].url == "https://api.example.com/v1"
    assert doc.resource.spec.resolved_api == "chat"
    (again,) = parse_text(json.dumps(doc.canonical()))
    assert again.resource == doc.resource


async def test_apply_refuses_unknown_models_and_fallbacks(store: Store) -> None:
    client = Client(store)
    agent = agent_doc("a", "tests.fixture_agents:Echo", model="big")
    with pytest.raises(SpecError, match='unknown model "big"'):
        await client.apply([agent])
    broken = policy_doc(_model(engine="sim", fallback="nowhere"))
    with pytest.raises(SpecError, match='unknown fallback model "nowhere"'):
        await client.apply([broken])
    assert await store.models.read() == {}
    changes = await client.apply([policy_doc(_model(engine="sim")), agent])
    assert {(c.kind, c.name, c.action) for c in changes} == {
        ("Model", "big", "created"),
        ("Agent", "a", "created"),
    }
    await client.apply([agent_doc("b", "tests.fixture_agents:Echo", model="big")])  # stored now


def test_ring_order_is_stable_and_moves_few_agents() -> None:
    three = ["http://a", "http://b", "http://c"]
    four = [*three, "http://d"]
    agents = [f"agent-{i}" for i in range(400)]
    first = {a: three[ring_order(a, three)[0]] for a in agents}
    assert first == {a: three[ring_order(a, three)[0]] for a in agents}
    assert sorted(ring_order("x", three)) == [0, 1, 2]
    assert set(first.values()) == set(three)
    moved = sum(1 for a in agents if four[ring_order(a, four)[0]] != first[a])
    assert moved < len(agents) / 2  # only those that now hash to the new replica
    assert all(
        four[ring_order(a, four)[0]] == "http://d"
        for a in agents
        if four[ring_order(a, four)[0]] != first[a]
    )


def test_usage_by_model_is_priced_per_model() -> None:
    records = {
        ("a", "2026-12-01"): {
            **model_usage("big", tokens_in=1000, cached=2000, tokens_out=500),
            "tokens_in": 1000.0,
        },
        ("b", "2026-12-01"): model_usage("big", tokens_in=1000, cached=0, tokens_out=0),
        ("b", "2026-12-02"): model_usage("default", tokens_in=7, cached=0, tokens_out=1),
    }
    prices = {"big": ModelPrices(input=1.0, cached_input=0.5, output=4.0)}
    big, default = by_model(records, prices)
    assert (big.model, big.calls, big.tokens_in, big.tokens_cached, big.tokens_out) == (
        "big",
        2,
        2000,
        2000,
        500,
    )
    assert big.cost == pytest.approx(2.0 + 1.0 + 2.0)
    assert (default.model, default.cost) == ("default", 0.0)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_down_model_falls_back_when_the_agent_allows_it(store: Store) -> None:
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    with openai_server() as backup:
        await apply(
            store,
            policy_doc(_model("backup", engine="openai", endpoints=[{"url": backup.url}])),
            policy_doc(
                _model(
                    "primary",
                    engine="openai",
                    endpoints=[{"url": dead}],
                    fallback="backup",
                    prices={"input": 5.0},
                )
            ),
            agent_doc(
                "keen",
                "tests.fixture_agents:Echo",
                model="primary",
                config={"llm": True},
                triggers=[{"inbox": {}}],
            ),
            agent_doc(
                "strict",
                "tests.fixture_agents:Echo",
                model="primary",
                modelFallback=False,
                config={"llm": True},
                triggers=[{"inbox": {}}],
            ),
        )
        async with running_daemon(store, metering_flush_s=0.1):
            await store.inbox.send("keen", "hello")
            await store.inbox.send("strict", "hello")
            await wait_until(lambda: status_is(store, "keen", tasks_succeeded="1"), within=30)
            await wait_until(lambda: _event(store, "strict", "InfrastructureError"), within=30)
        served = {r["user"] for r in backup.behaviour.requests}
    assert served == {"keen.fallback"}
    raw = await store.agents.load_state("keen")
    assert raw is not None
    assert msgspec.json.decode(raw, type=EchoState).replies == [" reply 1"]
    rows = {r.model: r for r in await Client(store).usage_by_model()}
    assert set(rows) == {"backup"}  # charged to the model that did the work
    assert rows["backup"].calls == 1


async def _event(store: Store, name: str, kind: str) -> bool:
    return any(e.type == kind for e in await store.events.read(name))


@pytest.mark.e2e
async def test_cli_shows_models_and_never_their_secrets(
    env: dict[str, str], tmp_path: Path
) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("sk-file-secret\n")
    spec = tmp_path / "models.yaml"
    spec.write_text(
        yaml.safe_dump_all(
            [
                _model(
                    "big",
                    engine="openai",
                    endpoints=[{"url": "https://api.example.com/v1"}],
                    credentials={"apiKey": {"file": str(secret_file)}},
                    prices={"input": 0.5},
                ),
                {
                    "apiVersion": "agentos/v1",
                    "kind": "Agent",
                    "metadata": {"name": "a"},
                    "spec": {"entrypoint": "tests.fixture_agents:Echo", "model": "big"},
                },
            ]
        )
    )
    applied = await cli(env, "apply", "-f", str(spec))
    assert applied.returncode == 0, show(applied)
    assert "model/big created" in applied.stdout
    listed = await cli(env, "get", "models")
    assert listed.returncode == 0, show(listed)
    assert "big" in listed.stdout
    assert "openai" in listed.stdout
    described = await cli(env, "describe", "model", "big")
    assert described.returncode == 0, show(described)
    assert f"from file {secret_file}" in described.stdout
    as_yaml = await cli(env, "get", "models", "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout)[0]["agents"] == ["a"]
    usage = await cli(env, "usage", "--by", "model", "-o", "json")
    assert usage.returncode == 0, show(usage)
    refused = await cli(env, "delete", "model", "big")
    assert refused.returncode == 1, show(refused)
    assert "used by agents: a" in refused.stderr, show(refused)
    for proc in (applied, listed, described, as_yaml, usage, refused):
        assert "sk-file-secret" not in proc.stdout + proc.stderr
    missing = await cli(env, "describe", "model", "nope")
    assert missing.returncode == 1


async def test_the_two_model_example_routes_hard_questions_to_the_large_model(
    store: Store, tmp_path: Path
) -> None:
    docs = load_paths([EXAMPLE])
    assert {d.name for d in docs} == {"large", "triage", "expert"}
    outbox = tmp_path / "outbox.jsonl"
    runnable = []
    for doc in docs:
        body = doc.canonical()
        if doc.kind == "Model":  # the same wiring on the sim engine: no server to start
            body["spec"] = {"engine": "sim", "prices": body["spec"]["prices"]}
        else:
            body["spec"]["config"]["outbox"] = str(outbox)
        runnable.append(policy_doc(body))
    await apply(store, *runnable)
    async with running_daemon(store, metering_flush_s=0.1):
        await store.inbox.send("triage", "What is the capital of Italy?")
        await store.inbox.send("triage", "!expert Why is the halting problem undecidable?")
        await wait_until(lambda: status_is(store, "expert", tasks_succeeded="1"), within=30)
        await wait_until(lambda: status_is(store, "triage", tasks_succeeded="2"), within=30)

        def answered() -> list[dict[str, Any]]:
            if not outbox.exists():
                return []
            return [json.loads(line) for line in outbox.read_text().splitlines()]

        async def both() -> list[dict[str, Any]]:
            rows = answered()
            return rows if len(rows) >= 2 else []

        rows = await wait_until(both, within=30, what="two answers")
    by_question = {r["question"]: r["by"] for r in rows}
    assert by_question["Why is the halting problem undecidable?"] == "large"
    assert len(rows) == 2
    models = {r.model for r in await Client(store).usage_by_model()}
    assert "large" in models


async def test_a_model_that_cannot_start_is_reported_once_and_names_no_secret(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTOS_ABSENT_KEY", raising=False)
    await apply(
        store,
        policy_doc(
            _model(
                "keyless",
                engine="openai",
                endpoints=[{"url": "http://127.0.0.1:9/v1"}],
                credentials={"apiKey": {"env": "AGENTOS_ABSENT_KEY"}},
            )
        ),
        agent_doc("waiting", "tests.fixture_agents:Echo", model="keyless"),
    )

    async def reported() -> list[Any]:
        return [e for e in await store.events.read(None) if e.type == "ModelUnavailable"]

    async with running_daemon(store) as daemon:
        (event,) = await wait_until(reported, within=10, what="a ModelUnavailable event")
        for _ in range(5):  # more reconcile passes: no second report
            await daemon._reconcile_once()
        assert len(await reported()) == 1
        # The agent runs on a stand-in engine: its model calls park with the reason, and
        # fixing the credential rebuilds the engine (tests/system/cli/test_model_faults.py).
        condition = daemon.models.describe()["keyless"]["condition"]
        assert condition is not None
        assert "AGENTOS_ABSENT_KEY" in condition["reason"]
    assert event.agent == "waiting"
    assert "AGENTOS_ABSENT_KEY" in event.message
