"""Routes: candidates filtered by data boundary, capabilities, health and budget; cascades
that escalate; the cost of moving a conversation; refusals at apply (routes on a running
daemon: test_routes_daemon.py)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from agentos.core.route import Call, Candidate, ModelStats, choose, projected_cost, reply_problem
from agentos.core.routespec import Route
from agentos.core.spec import SpecError, parse_text
from agentos.store import Store
from tests.helpers import (
    model_body,
    policy_doc,
)

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
        return parse_resource(model_body(name, **spec))

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


async def test_a_route_to_a_missing_model_or_past_every_boundary_is_refused(store: Store) -> None:
    from agentos.client import Client

    hosted = policy_doc(model_body("hosted", engine="sim", placement={"tier": "hosted"}))
    (missing,) = parse_text(_agent({"route": {"models": ["hosted", "ghost"]}}), "a.yaml")
    with pytest.raises(SpecError, match=r"ghost") as caught:
        await Client(store).apply([hosted, missing])
    assert caught.value.issues[0].path == "spec.route.models[1]"
    (strict,) = parse_text(
        _agent({"route": {"models": ["hosted"], "dataClass": "region:eu"}}), "a.yaml"
    )
    with pytest.raises(SpecError, match=r"no candidate keeps data within region:eu"):
        await Client(store).apply([hosted, strict])
    assert await store.specs.agents() == {}  # nothing applied
