"""Routes: candidates filtered by data boundary, capabilities, health and budget; cascades
that escalate; the cost of moving a conversation; refusals at apply."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from agentos.core.route import Call, Candidate, ModelStats, choose, projected_cost, reply_problem
from agentos.core.routespec import Route
from agentos.core.spec import SpecError, parse_text
from agentos.daemon import Daemon
from agentos.engine import SimEngine
from agentos.store import Store
from tests.helpers import agent_doc, apply, finished, policy_doc, running_daemon, wait_until

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------ pure decisions


@pytest.mark.parametrize(
    ("boundary", "data_class", "ok"),
    [
        ("host", "host", True),
        ("host", "region:eu", True),
        ("site", "host", False),
        ("site", "site", True),
        ("site", "region:eu", True),
        ("region:eu", "region:eu", True),
        ("region:eu", "region:us", False),
        ("region:eu", "site", False),
        ("any", "region:eu", False),
        ("any", "any", True),
        ("region:us", "any", True),
    ],
)
def test_a_boundary_is_within_a_data_class(boundary: str, data_class: str, ok: bool) -> None:
    from agentos.core.route import within

    assert within(boundary, data_class) is ok


LOCAL = Candidate("local", "host", 0.0, 0.0, 0.0)
EU = Candidate("eu", "region:eu", 0.001, 0.0005, 0.002)
HOSTED = Candidate("hosted", "any", 0.01, 0.005, 0.03)
CALL = Call(new_tokens=100, history_tokens=1000, max_tokens=100)


def _route(**fields: Any) -> Route:
    return Route.model_validate({"models": ["local", "eu", "hosted"], **fields})


def test_a_cascade_starts_first_and_escalates_by_level() -> None:
    route = _route()
    cands = [LOCAL, EU, HOSTED]
    assert choose(route, cands, CALL, stats={}, now=0).model == "local"
    assert choose(route, cands, CALL, stats={}, now=0, level=2).model == "hosted"


def test_the_data_class_is_a_hard_filter_even_when_the_rest_is_down() -> None:
    route = _route(dataClass="host")
    stats = {"local": ModelStats(cooldown_until=50, cooldown_why="503")}
    choice = choose(route, [LOCAL, EU, HOSTED], CALL, stats=stats, now=0)
    assert choice.model is None
    skipped = dict(choice.skipped)
    assert "cooling down" in skipped["local"]
    assert "outside dataClass host" in skipped["hosted"]
    assert "outside dataClass host" in skipped["eu"]


def test_a_cold_model_pays_the_re_prefill_and_a_warm_one_the_cached_price() -> None:
    cold = projected_cost(EU, CALL, None)
    warm = projected_cost(EU, Call(100, 1000, 100, warm=frozenset({"eu"})), None)
    assert cold == pytest.approx((100 * 0.001 + 1000 * 0.001 + 50 * 0.002) / 1000)
    assert warm == pytest.approx((100 * 0.001 + 1000 * 0.0005 + 50 * 0.002) / 1000)


def test_cheapest_counts_the_cost_of_moving() -> None:
    route = Route.model_validate({"models": ["eu", "eu2"], "strategy": "cheapest"})
    eu2 = Candidate("eu2", "region:eu", 0.0009, 0.0009, 0.002)
    # eu2 is cheaper per token, but eu holds the conversation (cached at half price).
    call = Call(100, 5000, 100, warm=frozenset({"eu"}))
    assert choose(route, [EU, eu2], call, stats={}, now=0).model == "eu"
    assert choose(route, [EU, eu2], Call(100, 5000, 100), stats={}, now=0).model == "eu2"


def test_a_budget_sends_the_call_to_a_cheaper_model_or_nowhere() -> None:
    route = Route.model_validate({"models": ["hosted", "local"], "maxCostPerTask": 0.01})
    choice = choose(route, [HOSTED, LOCAL], CALL, stats={}, now=0, spent=0.0)
    assert choice.model == "local"
    assert "remaining budget" in dict(choice.skipped)["hosted"]
    priced = Candidate("local", "host", 0.01, 0.01, 0.01)
    nothing = choose(route, [HOSTED, priced], CALL, stats={}, now=0, spent=0.009)
    assert nothing.model is None


def test_a_slow_model_is_used_only_when_nothing_faster_is_left() -> None:
    route = _route(ttftTarget="1s")
    stats = {"local": ModelStats(ttft_s=3.0)}
    assert choose(route, [LOCAL, EU, HOSTED], CALL, stats=stats, now=0).model == "eu"
    only = choose(route, [LOCAL], CALL, stats=stats, now=0)
    assert only.model == "local"
    assert "slower" in only.reason


def test_a_host_or_site_model_in_another_region_is_outside_that_region() -> None:
    from agentos.core.route import within

    assert within("site", "region:eu", "eu")
    assert within("site", "region:eu", None)  # no region declared: taken at its word
    assert not within("site", "region:eu", "us")
    assert not within("host", "region:eu", "us")
    route = Route.model_validate({"models": ["us-gpu", "eu"], "dataClass": "region:eu"})
    us = Candidate("us-gpu", "site", region="us")
    choice = choose(route, [us, EU], CALL, stats={}, now=0)
    assert choice.model == "eu"
    assert "in region us is outside dataClass region:eu" in dict(choice.skipped)["us-gpu"]


def test_a_daemon_hosts_a_route_only_through_a_candidate_within_its_data_class() -> None:
    from agentos.core.placement import hostable
    from agentos.core.spec import parse_resource

    def model(name: str, **spec: Any) -> Any:
        return parse_resource(_model(name, **spec))

    models = {
        "local-small": model("local-small", engine="sim", placement={"site": "a"}),
        "hosted": model("hosted", engine="sim", placement={"tier": "hosted"}),
    }
    (doc,) = parse_text(
        _agent({"route": {"models": ["local-small", "hosted"], "dataClass": "host"}}), "a.yaml"
    )
    spec = doc.resource.spec  # type: ignore[union-attr]
    assert hostable({"site": "a"}, spec, models) == ""
    why = hostable({"site": "b"}, spec, models)
    assert "local-small" in why
    assert "hosted is outside dataClass host" in why


def test_capabilities_filter_tools_and_context() -> None:
    route = _route()
    no_tools = Candidate("local", "host", tools=False, max_context=512)
    choice = choose(route, [no_tools, EU], Call(10, 10, 10, needs_tools=True), stats={}, now=0)
    assert choice.model == "eu"
    choice = choose(route, [no_tools, EU], CALL, stats={}, now=0)
    assert choice.model == "eu"
    assert "context" in dict(choice.skipped)["local"]


@pytest.mark.parametrize(
    ("content", "calls", "json_wanted", "problem"),
    [
        ("", [], False, "empty answer"),
        ("hi", [], True, "not valid JSON"),
        ('{"a": 1}', [], True, ""),
        ("", [("add", {"a": "x"}, None)], False, "tool call add"),
        ("", [("add", {"a": 1}, None)], False, ""),
        ("", [("nope", {}, None)], False, "no such tool"),
    ],
)
def test_a_reply_is_checked_against_its_call(
    content: str, calls: list[Any], json_wanted: bool, problem: str
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    found = reply_problem(content, calls, tools={"add": schema}, json_wanted=json_wanted)
    assert (problem in found) if problem else found == ""


# ------------------------------------------------------------------------ apply refusals


def _agent(spec: dict[str, Any]) -> str:
    body = {
        "apiVersion": "agentos/v1",
        "kind": "Agent",
        "metadata": {"name": "a"},
        "spec": {"entrypoint": "tests.route_agents:JsonAsker", **spec},
    }
    return yaml.safe_dump(body, sort_keys=False)


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"model": "x", "route": {"models": ["x"]}}, "spec.route", "not both"),
        ({"route": {"models": []}}, "spec.route.models", "at least 1"),
        ({"route": {"models": ["a", "a"]}}, "spec.route.models[1]", "twice"),
        ({"route": {"models": ["a"], "maxCostPerTask": -1}}, "spec.route.maxCostPerTask", ""),
        ({"route": {"models": ["a"], "maxCostPerTask": "lots"}}, "spec.route.maxCostPerTask", ""),
        ({"route": {"models": ["a"], "ttftTarget": "soon"}}, "spec.route.ttftTarget", ""),
        ({"route": {"models": ["a"], "dataClass": "moon"}}, "spec.route.dataClass", "region"),
        ({"route": {"models": ["a"], "strategy": "random"}}, "spec.route.strategy", ""),
    ],
)
def test_a_bad_route_is_refused_with_its_line(spec: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_text(_agent(spec), source="a.yaml")
    issues = caught.value.issues
    assert any(i.path == path and words in i.message for i in issues), issues
    assert all(i.line > 0 for i in issues)


def _model(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "agentos/v1", "kind": "Model", "metadata": {"name": name}, "spec": spec}


async def test_a_route_to_a_missing_model_or_past_every_boundary_is_refused(store: Store) -> None:
    from agentos.client import Client

    hosted = policy_doc(_model("hosted", engine="sim", placement={"tier": "hosted"}))
    (missing,) = parse_text(_agent({"route": {"models": ["hosted", "ghost"]}}), "a.yaml")
    with pytest.raises(SpecError, match=r"ghost") as caught:
        await Client(store).apply([hosted, missing])
    assert caught.value.issues[0].path == "spec.route.models[1]"
    (strict,) = parse_text(
        _agent({"route": {"models": ["hosted"], "dataClass": "region:eu"}}), "a.yaml"
    )
    with pytest.raises(SpecError, match=r"no candidate keeps data within region:eu"):
        await Client(store).apply([hosted, strict])
    assert await store.agent_specs() == {}  # nothing applied


# ------------------------------------------------------------------------ on a daemon


SMALL = _model("small", engine="sim", prices={"input": 0.001, "output": 0.002})
LARGE = _model(
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
    return [e for e in await store.events(agent, count=200) if e.type == kind]


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
        first = await store.send("asker", "what is the answer?")
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
        second = await store.send("asker", "and again?")
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
        msg = await store.send("traced", "q")
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
        easy = await store.send("climber", "an easy one " * 20)
        record = await finished(store, "climber", f"m-{easy}")
        assert json.loads(record["result"])[:3] == ["small", "small", False]
        hard = await store.send("climber", "a hard one")
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
            records = await store.usage(["climber"], [today])
            amounts: dict[str, float] = {}
            for day in records.values():
                amounts.update(day)
            return amounts if amounts.get("model:large:in", 0) >= second_in else None

        amounts = await wait_until(usage, what="the large model's tokens metered")
        assert amounts["model:large:calls"] == 1


async def test_a_host_only_agent_parks_rather_than_reach_a_hosted_model(store: Store) -> None:
    local = _model(
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
        msg = await store.send("private", "keep this on the host")

        async def parked() -> dict[str, str] | None:
            record = await store.task("private", f"m-{msg}")
            return record if record.get("status") in ("retrying", "parked") else None

        record = await wait_until(parked, within=20, what="the task to park")
        assert "data boundary any is outside dataClass host" in record["error"]
        (exhausted, *_) = await _events(store, "private", "RouteExhausted")
        assert "large: data boundary any is outside dataClass host" in exhausted.message
        assert "local-small" in exhausted.message
        assert "large" not in daemon.models.entries  # never even started
        st = await store.status("private")
        assert st.get("reason") == "InfrastructureError"
        crash = await store.status("private")
        assert crash.get("restarts", "0") == "0"


async def test_a_failed_model_fails_over_and_cools_down(store: Store) -> None:
    broken = _model(
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
        one = await store.send("steady", "first")
        record = await finished(store, "steady", f"m-{one}")
        result = json.loads(record["result"])
        assert result["by"] == "small"
        assert "broken: failed this call" in result["why"]
        two = await store.send("steady", "second")
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
        msg = await store.send("thrifty", "a question")
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
        msg = await store.send("spender", "an expensive question")

        async def parked() -> dict[str, str] | None:
            st = await store.status("spender")
            return st if st.get("reason") == "BudgetExhausted" else None

        st = await wait_until(parked, within=20, what="the class's money to run out")
        assert "dailyCost" in st["message"]
        record = await store.task("spender", f"m-{msg}")
        assert record.get("status") not in ("succeeded", "failed")
        assert st.get("restarts", "0") == "0"


async def test_on_exhausted_fail_raises_to_the_agent(store: Store) -> None:
    local = _model(
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
        msg = await store.send("strict", "anything")
        record = await finished(store, "strict", f"m-{msg}")
        assert record["status"] == "failed"
        assert "RouteExhausted" in record["error"]
        assert "gone: failed this call" in record["error"]


async def test_the_routes_example_escalates_and_keeps_private_data_home(store: Store) -> None:
    from pathlib import Path

    from agentos.core.spec import load_paths

    docs = []
    for doc in load_paths([Path(__file__).parent.parent / "examples" / "routes"]):
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
        easy = await store.send("helpdesk", "How do I reload a Model?")
        hard = await store.send("helpdesk", "How do I rotate the API key of a Model?")
        notes = await store.send("private-notes", "Summarise: salaries are reviewed Friday.")
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
    assert not [e for e in await store.events("private-notes", count=100) if e.type == "Escalated"]


async def test_a_candidate_s_own_fallback_never_carries_data_past_the_class(
    store: Store,
) -> None:
    down = {"connect": "0.5s", "request": "1s", "throttleWait": "0s"}
    url = [{"url": "http://127.0.0.1:9/v1"}]
    await apply(
        store,
        policy_doc(LARGE),  # hosted: boundary any
        policy_doc(_model("near", engine="openai", endpoints=url, timeouts=down, fallback="large")),
        policy_doc(
            _model(
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
        msg = await store.send("resident", "stay in the EU")

        async def parked() -> dict[str, str] | None:
            record = await store.task("resident", f"m-{msg}")
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
        msg = await store.send("capped", "too dear")
        record = await finished(store, "capped", f"m-{msg}")
        assert record["status"] == "failed"
        assert record["error"].startswith("maxCostPerTask: the task has spent 0 of 0.0001")
        assert large.stats.chats == 0
        st = await store.status("capped")
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
                sent.append((agent, f"m-{await store.send(agent, f'question {i}')}"))
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
