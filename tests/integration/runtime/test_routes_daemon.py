"""Routes on a running daemon: a cascade escalates on a failed check and pays for the move,
a host-only agent parks rather than reach a hosted model, failover and cooldown, budgets
that send calls to a cheaper model or end the task, and usage by route."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from agentos.core.route import Candidate
from agentos.core.routespec import Route
from agentos.daemon import Daemon
from agentos.engine import SimEngine
from agentos.store import Store
from tests.helpers import (
    agent_doc,
    apply,
    finished,
    model_body,
    policy_doc,
    running_daemon,
    wait_until,
)

pytestmark = pytest.mark.anyio

SMALL = model_body("small", engine="sim", prices={"input": 0.001, "output": 0.002})
LARGE = model_body(
    "large",
    engine="sim",
    placement={"tier": "hosted"},
    prices={"input": 0.01, "cachedInput": 0.005, "output": 0.03},
)


async def _sim(daemon: Daemon, model: str) -> SimEngine:
    entry = await daemon.models.entry(model)
    assert entry.served is not None
    engine = entry.served.inner
    assert isinstance(engine, SimEngine)
    return engine


async def _events(store: Store, agent: str, kind: str) -> list[Any]:
    return [e for e in await store.events.read(agent, count=200) if e.type == kind]


async def test_a_cascade_escalates_when_a_reply_fails_its_check(store: Store) -> None:
    await apply(
        store,
        policy_doc(SMALL),
        policy_doc(LARGE),
        agent_doc("asker", "tests.route_agents:JsonAsker", route={"models": ["small", "large"]}),
    )
    async with running_daemon(store, metering_flush_s=0.1) as daemon:
        small, large = await _sim(daemon, "small"), await _sim(daemon, "large")
        small.script("asker", "not json at all", '{"fine": true}')
        large.script("asker.route", '{"answer": 42}')
        first = await store.inbox.send("asker", "what is the answer?")
        record = await finished(store, "asker", f"m-{first}")
        result = json.loads(record["result"])
        assert result["by"] == "large"
        assert json.loads(result["text"]) == {"answer": 42}
        assert "escalated" in result["why"]
        (escalated,) = await _events(store, "asker", "Escalated")
        assert escalated.reason == "small"
        assert "not valid JSON" in escalated.message
        # The next task starts on the first candidate again, whose conversation is
        # rebuilt without the rejected reply and with what the large model answered.
        second = await store.inbox.send("asker", "and again?")
        record = await finished(store, "asker", f"m-{second}")
        assert json.loads(record["result"])["by"] == "small"
        conversation = small.conversation("asker")
        assert [(m["role"], m["content"]) for m in conversation] == [
            ("user", "what is the answer?"),
            ("assistant", '{"answer": 42}'),
            ("user", "and again?"),
            ("assistant", '{"fine": true}'),
        ]
        # The large model saw the question once, without the rejected reply.
        assert large.stats.chats == 1
        routed = [e.reason for e in await _events(store, "asker", "Routed")]
        assert routed == ["small", "large", "small"]


async def test_an_inference_span_names_the_model_that_served_it_and_why(store: Store) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentos.telemetry import Telemetry

    exporter = InMemorySpanExporter()
    telemetry = Telemetry.from_env(
        "tests", env={}, span_processors=(SimpleSpanProcessor(exporter),)
    )
    await apply(
        store,
        policy_doc(SMALL),
        policy_doc(LARGE),
        agent_doc("traced", "tests.route_agents:JsonAsker", route={"models": ["small", "large"]}),
    )
    async with running_daemon(store, telemetry=telemetry) as daemon:
        small, large = await _sim(daemon, "small"), await _sim(daemon, "large")
        small.script("traced", "no json")
        large.script("traced.route", '{"ok": 1}')
        msg = await store.inbox.send("traced", "q")
        await finished(store, "traced", f"m-{msg}")
    chats = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    (span,) = chats  # one call of the agent, whatever the route did inside it
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.response.model"] == "large"
    assert "escalated" in str(attributes["agentos.route.reason"])
    assert "gen_ai.usage.cache_read.input_tokens" in attributes


async def test_escalate_moves_the_conversation_and_the_move_is_paid(store: Store) -> None:
    await apply(
        store,
        policy_doc(SMALL),
        policy_doc(LARGE),
        agent_doc("climber", "tests.route_agents:Escalator", route={"models": ["small", "large"]}),
    )
    async with running_daemon(store, metering_flush_s=0.1) as daemon:
        small, large = await _sim(daemon, "small"), await _sim(daemon, "large")
        easy = await store.inbox.send("climber", "an easy one " * 20)
        record = await finished(store, "climber", f"m-{easy}")
        assert json.loads(record["result"])[:3] == ["small", "small", False]
        hard = await store.inbox.send("climber", "a hard one")
        record = await finished(store, "climber", f"m-{hard}")
        first, second, escalated, second_in = json.loads(record["result"])
        assert (first, second, escalated) == ("small", "large", True)
        # The large model got the whole conversation: a re-prefill of everything the
        # small one holds (four turns and more), priced at the large model's input price.
        history = small.session_info("climber").n_tokens
        assert second_in >= history > 60
        assert large.stats.prefill_tokens >= history

        async def usage() -> dict[str, float] | None:
            today = time.strftime("%Y-%m-%d", time.gmtime())
            records = await store.usage.read(["climber"], [today])
            amounts: dict[str, float] = {}
            for day in records.values():
                amounts.update(day)
            return amounts if amounts.get("model:large:in", 0) >= second_in else None

        amounts = await wait_until(usage, what="the large model's tokens metered")
        assert amounts["model:large:calls"] == 1


async def test_a_host_only_agent_parks_rather_than_reach_a_hosted_model(store: Store) -> None:
    local = model_body(
        "local-small",
        engine="openai",
        endpoints=[{"url": "http://127.0.0.1:9/v1"}],
        placement={"tier": "local", "dataBoundary": "host"},
        timeouts={"connect": "0.5s", "request": "1s", "throttleWait": "0s"},
    )
    await apply(
        store,
        policy_doc(local),
        policy_doc(LARGE),
        agent_doc(
            "private",
            "tests.route_agents:JsonAsker",
            route={"models": ["local-small", "large"], "dataClass": "host"},
        ),
    )
    async with running_daemon(store) as daemon:
        msg = await store.inbox.send("private", "keep this on the host")

        async def parked() -> dict[str, str] | None:
            record = await store.tasks.get("private", f"m-{msg}")
            return record if record.get("status") in ("retrying", "parked") else None

        record = await wait_until(parked, within=20, what="the task to park")
        assert "data boundary any is outside dataClass host" in record["error"]
        (exhausted, *_) = await _events(store, "private", "RouteExhausted")
        assert "large: data boundary any is outside dataClass host" in exhausted.message
        assert "local-small" in exhausted.message
        assert "large" not in daemon.models.entries  # never even started
        st = await store.agents.status("private")
        assert st.get("reason") == "InfrastructureError"
        crash = await store.agents.status("private")
        assert crash.get("restarts", "0") == "0"


async def test_a_failed_model_fails_over_and_cools_down(store: Store) -> None:
    broken = model_body(
        "broken",
        engine="openai",
        endpoints=[{"url": "http://127.0.0.1:9/v1"}],
        placement={"tier": "regional", "dataBoundary": "region:eu"},
        timeouts={"connect": "0.5s", "request": "1s", "throttleWait": "0s"},
    )
    await apply(
        store,
        policy_doc(broken),
        policy_doc(SMALL),
        agent_doc(
            "steady",
            "tests.route_agents:JsonAsker",
            route={"models": ["broken", "small"], "dataClass": "region:eu"},
        ),
    )
    async with running_daemon(store) as daemon:
        small = await _sim(daemon, "small")
        # broken holds the session (the first candidate it may serve); small answers in
        # a short-lived session of its own, with the conversation.
        small.script("steady.route", '{"a": 1}', '{"a": 2}')
        one = await store.inbox.send("steady", "first")
        record = await finished(store, "steady", f"m-{one}")
        result = json.loads(record["result"])
        assert result["by"] == "small"
        assert "broken: failed this call" in result["why"]
        two = await store.inbox.send("steady", "second")
        record = await finished(store, "steady", f"m-{two}")
        assert "broken: cooling down" in json.loads(record["result"])["why"]
        assert daemon.models.route_stats["broken"].cooldown_until > 0


async def test_a_task_budget_sends_calls_to_the_cheaper_model(store: Store) -> None:
    await apply(
        store,
        policy_doc(SMALL),
        policy_doc(LARGE),
        agent_doc(
            "thrifty",
            "tests.route_agents:JsonAsker",
            route={"models": ["large", "small"], "maxCostPerTask": 0.0001},
        ),
    )
    async with running_daemon(store) as daemon:
        small = await _sim(daemon, "small")
        small.script("thrifty.route", '{"cheap": true}')
        msg = await store.inbox.send("thrifty", "a question")
        record = await finished(store, "thrifty", f"m-{msg}")
        result = json.loads(record["result"])
        assert result["by"] == "small"
        assert "large: projected cost" in result["why"]
        assert "remaining budget" in result["why"]


async def test_a_class_out_of_daily_money_parks_with_budget_exhausted(store: Store) -> None:
    policy = {
        "apiVersion": "agentos/v1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "money"},
        "spec": {"classes": {"paid": {"dailyCost": 0.0001}}},
    }
    await apply(
        store,
        policy_doc(policy),
        policy_doc(LARGE),
        agent_doc("spender", "tests.route_agents:JsonAsker", model="large", quotaClass="paid"),
    )
    async with running_daemon(store):
        msg = await store.inbox.send("spender", "an expensive question")

        async def parked() -> dict[str, str] | None:
            st = await store.agents.status("spender")
            return st if st.get("reason") == "BudgetExhausted" else None

        st = await wait_until(parked, within=20, what="the class's money to run out")
        assert "dailyCost" in st["message"]
        record = await store.tasks.get("spender", f"m-{msg}")
        assert record.get("status") not in ("succeeded", "failed")
        assert st.get("restarts", "0") == "0"


async def test_on_exhausted_fail_raises_to_the_agent(store: Store) -> None:
    local = model_body(
        "gone",
        engine="openai",
        endpoints=[{"url": "http://127.0.0.1:9/v1"}],
        placement={"tier": "local"},
        timeouts={"connect": "0.5s", "request": "1s", "throttleWait": "0s"},
    )
    await apply(
        store,
        policy_doc(local),
        agent_doc(
            "strict",
            "tests.route_agents:JsonAsker",
            route={"models": ["gone"], "dataClass": "host", "onExhausted": "fail"},
        ),
    )
    async with running_daemon(store):
        msg = await store.inbox.send("strict", "anything")
        record = await finished(store, "strict", f"m-{msg}")
        assert record["status"] == "failed"
        assert "RouteExhausted" in record["error"]
        assert "gone: failed this call" in record["error"]


async def test_the_routes_example_escalates_and_keeps_private_data_home(store: Store) -> None:
    from pathlib import Path

    from agentos.core.spec import load_paths

    docs = []
    for doc in load_paths([Path(__file__).parents[3] / "examples" / "routes"]):
        body = doc.canonical()
        if doc.kind == "Model" and body["spec"]["engine"] != "sim":  # no server to start
            body["spec"] = {**body["spec"], "engine": "sim"}
            for key in ("slots", "contextLength", "idleStop"):
                body["spec"].pop(key, None)
        docs.append(policy_doc(body))
    await apply(store, *docs)
    async with running_daemon(store, metering_flush_s=0.1) as daemon:
        local, hosted = await _sim(daemon, "local-small"), await _sim(daemon, "hosted-large")
        local.script("helpdesk", '{"answer": "Apply the Model again.", "confident": true}')
        local.script("helpdesk", '{"answer": "maybe", "confident": false}')
        hosted.script("helpdesk.route", '{"answer": "Use apiKey: {env: VAR}.", "confident": true}')
        local.script("private-notes", "a summary that is not JSON")
        easy = await store.inbox.send("helpdesk", "How do I reload a Model?")
        hard = await store.inbox.send("helpdesk", "How do I rotate the API key of a Model?")
        notes = await store.inbox.send("private-notes", "Summarise: salaries are reviewed Friday.")
        first = await finished(store, "helpdesk", f"m-{easy}")
        second = await finished(store, "helpdesk", f"m-{hard}")
        private = await finished(store, "private-notes", f"m-{notes}")
    assert json.loads(first["result"])["by"] == "local-small"
    assert json.loads(second["result"])["by"] == "hosted-large"
    assert json.loads(first["outcome"])["verdict"] == "pass"
    assert json.loads(second["outcome"])["source"] == "evaluator"
    assert float(second["cost"]) > 0 == float(first["cost"])
    # Its reply failed the check, and nothing above it may see its data: it stays.
    assert json.loads(private["outcome"])["verdict"] == "fail"
    assert private["models"] == "local-small"
    assert hosted.stats.chats == 1  # the helpdesk's escalation, nothing of private-notes
    assert not [
        e for e in await store.events.read("private-notes", count=100) if e.type == "Escalated"
    ]


async def test_a_candidate_s_own_fallback_never_carries_data_past_the_class(
    store: Store,
) -> None:
    down = {"connect": "0.5s", "request": "1s", "throttleWait": "0s"}
    url = [{"url": "http://127.0.0.1:9/v1"}]
    await apply(
        store,
        policy_doc(LARGE),  # hosted: boundary any
        policy_doc(
            model_body("near", engine="openai", endpoints=url, timeouts=down, fallback="large")
        ),
        policy_doc(
            model_body(
                "eu",
                engine="openai",
                endpoints=url,
                timeouts=down,
                fallback="large",
                placement={"tier": "regional", "dataBoundary": "region:eu"},
            )
        ),
        agent_doc(
            "resident",
            "tests.route_agents:JsonAsker",
            route={"models": ["near", "eu"], "dataClass": "region:eu"},
        ),
    )
    async with running_daemon(store) as daemon:
        large = await _sim(daemon, "large")
        msg = await store.inbox.send("resident", "stay in the EU")

        async def parked() -> dict[str, str] | None:
            record = await store.tasks.get("resident", f"m-{msg}")
            return record if record.get("status") in ("retrying", "parked") else None

        record = await wait_until(parked, within=20, what="the task to park")
        assert "eu: failed this call" in record["error"]
        assert large.stats.chats == 0  # neither model's fallback answered


async def test_a_spent_task_budget_ends_the_task(store: Store) -> None:
    await apply(
        store,
        policy_doc(LARGE),
        agent_doc(
            "capped",
            "tests.route_agents:JsonAsker",
            route={"models": ["large"], "maxCostPerTask": 0.0001},
        ),
    )
    async with running_daemon(store) as daemon:
        large = await _sim(daemon, "large")
        msg = await store.inbox.send("capped", "too dear")
        record = await finished(store, "capped", f"m-{msg}")
        assert record["status"] == "failed"
        assert record["error"].startswith("maxCostPerTask: the task has spent 0 of 0.0001")
        assert large.stats.chats == 0
        st = await store.agents.status("capped")
        assert st.get("restarts", "0") == "0"


class _Recording(SimEngine):
    """A sim engine that records what each chat was sent, and can be down."""

    def __init__(self, model: str) -> None:
        super().__init__(model=model)
        self.down = False
        self.sent: list[list[tuple[str, str]]] = []

    async def chat(self, session_id: str, messages: Any, **options: Any) -> Any:  # type: ignore[override]
        if self.down:
            from agentos.engine.base import EngineUnavailable

            raise EngineUnavailable("503 from the test")
        self.sent.append([(m["role"], str(m.get("content"))) for m in messages])
        return await super().chat(session_id, messages, **options)


async def test_a_failover_right_after_a_rebuild_keeps_the_whole_conversation() -> None:
    from agentos.runtime.routes import RouteEngine

    home, other = _Recording("home"), _Recording("other")

    async def resolve(name: str) -> Any:
        return other

    route = Route.model_validate({"models": ["home", "other"]})
    engine = RouteEngine(
        agent="a",
        route=route,
        candidates=[Candidate("home"), Candidate("other")],
        home="home",
        primary=home,
        resolve=resolve,
        stats={},
    )
    task = ["t1"]
    engine.task_id = lambda: task[0]
    engine.open_session("a")
    home.script("a", "not json")
    other.script("a.route", '{"x": 1}', '{"y": 2}')
    asked = {"type": "json_object"}
    first = await engine.chat("a", [{"role": "user", "content": "q1"}], response_format=asked)
    assert first.served_by == "other"
    assert other.sent[-1] == [("user", "q1")]  # once, without the rejected reply
    task[0], home.down = "t2", True  # the next task: home is rebuilt, then fails
    second = await engine.chat("a", [{"role": "user", "content": "q2"}], response_format=asked)
    assert second.served_by == "other"
    assert other.sent[-1] == [
        ("user", "q1"),
        ("assistant", '{"x": 1}'),
        ("user", "q2"),
    ]
    assert [m["content"] for m in engine.conversation("a")] == ["q1", '{"x": 1}', "q2", '{"y": 2}']


async def test_usage_by_route_matches_the_task_records(store: Store) -> None:
    from agentos.client import Client

    cascade = {"models": ["small", "large"]}
    await apply(
        store,
        policy_doc(SMALL),
        policy_doc(LARGE),
        agent_doc("routed-a", "tests.route_agents:Judged", route=cascade),
        agent_doc("routed-b", "tests.route_agents:Judged", route=cascade),
        agent_doc("pinned", "tests.route_agents:Judged", model="large"),
    )
    sent: list[tuple[str, str]] = []
    async with running_daemon(store, metering_flush_s=0.1) as daemon:
        small, large = await _sim(daemon, "small"), await _sim(daemon, "large")
        # routed-a: right at once; routed-b: an empty answer escalates, then wrong;
        # pinned: right, then wrong.
        small.script("routed-a", "right", "right")
        small.script("routed-b", "")
        large.script("routed-b.route", "wrong")
        large.script("pinned", "right", "wrong")
        for agent, n in (("routed-a", 2), ("routed-b", 1), ("pinned", 2)):
            for i in range(n):
                sent.append((agent, f"m-{await store.inbox.send(agent, f'question {i}')}"))
        records = [await finished(store, agent, task) for agent, task in sent]

        async def counted() -> Any:
            report = await Client(store).usage_report(by="route", since_days=1)
            done = sum(r.tasks.passed + r.tasks.failed for r in report.rows)
            return report if done == len(sent) else None

        report = await wait_until(counted, what="every verdict counted")
    rows = {r.key: r for r in report.rows}
    assert set(rows) == {"cascade:small,large", "large"}
    for key, agents in (("cascade:small,large", {"routed-a", "routed-b"}), ("large", {"pinned"})):
        mine = [rec for (agent, _), rec in zip(sent, records, strict=True) if agent in agents]
        passed = sum(json.loads(r["outcome"])["verdict"] == "pass" for r in mine)
        cost = sum(float(r["cost"]) for r in mine)
        row = rows[key]
        assert row.tasks.passed == passed
        assert row.tasks.failed == len(mine) - passed
        assert row.token_cost == pytest.approx(cost, rel=1e-6)
        data = row.to_dict()
        assert data["successRate"] == pytest.approx(passed / len(mine))
        assert data["costPerSuccess"] == pytest.approx(row.cost / passed, rel=1e-6)
    assert rows["cascade:small,large"].tasks.passed == 2
    assert float(records[2]["cost"]) > 0  # the escalation was paid at the large model
