"""One price source for every `agentos usage` view, and success per agent, class, route and model.

Token prices come from each Model, agent-hours and KV storage from the one QuotaPolicy
that declares ``spec.prices``; every view adds them up the same way, and the success
rates and costs per successful task match the task records they come from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from agentos.client import Client
from agentos.core.metering import (
    PriceBook,
    UsageRow,
    aggregate,
    price_issues,
    price_warnings,
    total,
)
from agentos.core.modelspec import ModelPrices
from agentos.core.modelusage import by_model, model_total, model_usage, verdict_usage
from agentos.core.routespec import FleetPrices
from agentos.core.spec import SpecError, parse_text
from agentos.core.taskview import record_outcome
from agentos.engine import SimEngine
from agentos.store import Store
from tests.cli_support import cli, show
from tests.helpers import agent_doc, apply, finished, policy_doc, running_daemon, wait_until

pytestmark = pytest.mark.anyio

GRADED = "tests.system.cli.test_outcomes:Graded"
DAY = "2026-12-01"
SMALL = ModelPrices(input=0.001, cached_input=0.0005, output=0.002)
LARGE = ModelPrices(input=0.01, output=0.03)
FLEET = FleetPrices(per_agent_hour=3.6, per_gb_hour_kv=2.0)


def _model(name: str, prices: ModelPrices) -> Any:
    return policy_doc(
        {
            "apiVersion": "agentos/v1",
            "kind": "Model",
            "metadata": {"name": name},
            "spec": {"engine": "sim", "prices": prices.model_dump(by_alias=True)},
        }
    )


def _policy(name: str, classes: dict[str, Any], prices: FleetPrices | None = None) -> Any:
    spec: dict[str, Any] = {"classes": classes}
    if prices is not None:
        spec["prices"] = prices.model_dump(by_alias=True)
    body = {"apiVersion": "agentos/v1", "kind": "QuotaPolicy", "metadata": {"name": name}}
    text = json.dumps({**body, "spec": spec}, indent=2)  # one key a line: real line numbers
    (doc,) = parse_text(text, source=f"{name}.yaml")
    return doc


# ------------------------------------------------------------------------ pure views


def _records() -> dict[tuple[str, str], dict[str, float]]:
    a = {
        **model_usage("small", tokens_in=1000, cached=2000, tokens_out=500),
        "tokens_in": 1000.0,
        "tokens_out": 500.0,
        "active_s": 3600.0,
        "kv_byte_s": 1e9 * 1800,
        "tasks_succeeded": 3.0,
        **verdict_usage("pass", "small", 2.0),
        **verdict_usage("fail", "small", 1.0),
    }
    b = {
        **model_usage("large", tokens_in=100, cached=0, tokens_out=100),
        **model_usage("default", tokens_in=7, cached=0, tokens_out=1),
        "tokens_in": 107.0,
        "tokens_out": 101.0,
        "active_s": 1800.0,
        "tasks_succeeded": 2.0,
        **verdict_usage("pass", "large"),
        **verdict_usage("unknown", "default"),
    }
    return {("a", DAY): a, ("b", DAY): b}


BOOK = PriceBook({"small": SMALL, "large": LARGE}, FLEET, "fleet")


def test_every_view_is_priced_the_same_way() -> None:
    records = _records()
    agents = {r.key: r for r in aggregate(records, by="agent", book=BOOK)}
    a, b = agents["a"], agents["b"]
    assert a.token_cost == pytest.approx((1000 * 0.001 + 2000 * 0.0005 + 500 * 0.002) / 1000)
    assert a.cost == pytest.approx(a.token_cost + 1 * 3.6 + 0.5 * 2.0)
    assert b.token_cost == pytest.approx((100 * 0.01 + 100 * 0.03) / 1000)
    assert (a.tasks.passed, a.tasks.failed, a.tasks.unknown) == (2, 1, 0)
    assert a.tasks.success_rate == pytest.approx(2 / 3)
    assert a.to_dict()["costPerSuccess"] == pytest.approx(a.cost / 2)
    assert a.to_dict()["tokensPerSuccess"] == 750.0
    assert b.tasks.success_rate == 1.0  # the unknown is shown apart, not a failure

    models = by_model(records, BOOK.models)
    everyone = total(list(agents.values()))
    # The model view prices the tokens only: the token part of every other view.
    assert model_total(models).cost == pytest.approx(everyone.token_cost)
    classes = {"a": "x", "b": "x"}
    routes = {"a": "cascade:small,large", "b": "large"}
    for by in ("class", "route", "day"):
        rows = aggregate(records, by=by, book=BOOK, classes=classes, routes=routes)
        assert total(rows).cost == pytest.approx(everyone.cost), by
        assert total(rows).tasks == everyone.tasks, by
    keys = {r.key for r in aggregate(records, by="route", book=BOOK, routes={"a": "r"})}
    assert keys == {"r", "?"}
    small = next(r for r in models if r.model == "small")
    assert (small.tasks.passed, small.tasks.failed) == (2, 1)
    assert model_total(models).tasks == everyone.tasks  # each task once, on its last model
    with pytest.raises(ValueError, match="cannot group"):
        aggregate(records, by="model", book=BOOK)


def test_missing_prices_are_named() -> None:
    records = _records()
    book = PriceBook({"small": SMALL, "large": ModelPrices()})
    warnings = price_warnings(records, book, by="agent")
    assert any('model "default" has no prices' in w and "--engine" in w for w in warnings)
    assert any('model "large" declares no spec.prices' in w for w in warnings)
    assert any("no QuotaPolicy declares spec.prices" in w for w in warnings)
    assert not any('"small"' in w for w in warnings)
    # The model view leaves hours and KV out: no fleet prices is nothing missing there.
    assert not any("QuotaPolicy" in w for w in price_warnings(records, book, by="model"))
    assert (
        price_warnings(
            records,
            PriceBook({"small": SMALL, "large": LARGE, "default": SMALL}, FLEET),
            by="agent",
        )
        == []
    )


def test_a_row_without_verdicts_shows_none_and_keeps_its_old_keys() -> None:
    row = UsageRow("x", 1.0, 10, 10, 0.0, 2, 0, 1.0)
    data = row.to_dict()
    assert data["costPerTask"] == 0.5
    assert (data["tasksPass"], data["successRate"], data["costPerSuccess"]) == (0, None, None)


def test_a_second_prices_declaring_policy_is_refused_with_file_and_line() -> None:
    first = _policy("fleet", {"a": {}}, FLEET)
    second = _policy("other", {"b": {}}, FLEET)
    plain = _policy("plain", {"c": {}})
    (issue,) = price_issues([first, second, plain], {})
    assert str(issue).startswith("other.yaml:")
    assert issue.line > 0
    assert issue.path == "spec.prices"
    assert 'declared by QuotaPolicy "fleet" (applied with it)' in issue.message
    stored = {"fleet": first.resource}
    (issue,) = price_issues([second], stored)
    assert "(stored)" in issue.message
    assert price_issues([first], stored) == []  # the same policy again
    assert price_issues([plain], stored) == []


async def test_apply_refuses_a_second_prices_policy_and_applies_nothing(store: Store) -> None:
    client = Client(store)
    await client.apply([_policy("fleet", {"a": {}}, FLEET)])
    with pytest.raises(SpecError) as refused:
        await client.apply([_policy("other", {"b": {}}, FLEET), _policy("plain", {"c": {}})])
    (issue,) = refused.value.issues
    assert str(issue).startswith("other.yaml:")
    assert "fleet" in issue.message
    assert set(await store.specs.policies()) == {"fleet"}
    await client.apply([_policy("fleet", {"a": {}}, FleetPrices(per_agent_hour=1.0))])


# --------------------------------------------------------------- a fleet at work


async def _fleet(store: Store) -> dict[str, list[dict[str, str]]]:
    """Three agents on two priced Models under one priced policy, each given tasks that
    pass, fail and say nothing; their finished records."""
    await apply(
        store,
        _model("small", SMALL),
        _model("large", LARGE),
        _policy("fleet", {"cheap": {}, "dear": {}}, FLEET),
        agent_doc(
            "scout",
            GRADED,
            model="small",
            quotaClass="cheap",
            config={"llm": True},
            triggers=[{"inbox": {}}],
        ),
        agent_doc(
            "sage",
            GRADED,
            model="large",
            quotaClass="dear",
            config={"llm": True},
            triggers=[{"inbox": {}}],
        ),
        agent_doc(
            "twin",
            GRADED,
            model="small",
            quotaClass="dear",
            config={"llm": True},
            triggers=[{"inbox": {}}],
        ),
    )
    work = {
        "scout": ["ok a", "ok b", "bad c", "d"],
        "sage": ["ok a", "bad b", "bad c"],
        "twin": ["ok a", "e"],
    }
    client = Client(store)
    records: dict[str, list[dict[str, str]]] = {}
    async with running_daemon(store, SimEngine(), metering_flush_s=0.1):
        for agent, bodies in work.items():
            ids = [await client.send(agent, body) for body in bodies]
            records[agent] = [await finished(store, agent, f"m-{i}") for i in ids]

        async def counted() -> bool:
            day = time.strftime("%Y-%m-%d", time.gmtime())
            usage = await store.usage.read(list(work), [day])
            return all(
                sum(
                    usage.get((a, day), {}).get(f"tasks_{v}", 0)
                    for v in ("pass", "fail", "unknown")
                )
                == len(b)
                for a, b in work.items()
            )

        await wait_until(counted, within=20, what="every verdict counted")
    return records


def _expected(records: list[dict[str, str]]) -> tuple[int, int, int, float]:
    verdicts = [record_outcome(r).verdict for r in records]  # type: ignore[union-attr]
    cost = sum(float(r["cost"]) for r in records)
    return verdicts.count("pass"), verdicts.count("fail"), verdicts.count("unknown"), cost


async def test_usage_by_every_view_matches_the_task_records(store: Store) -> None:
    records = await _fleet(store)
    client = Client(store)
    agents = await client.usage_report(by="agent")
    assert agents.warnings == ()  # every model priced, fleet prices declared
    for row in agents.rows:
        assert isinstance(row, UsageRow)
        passed, failed, unknown, cost = _expected(records[row.key])
        assert (row.tasks.passed, row.tasks.failed, row.tasks.unknown) == (passed, failed, unknown)
        assert row.token_cost == pytest.approx(cost, rel=1e-6)
        assert cost > 0
        assert row.cost == pytest.approx(
            row.token_cost + row.agent_hours * 3.6 + row.kv_gb_hours * 2.0
        )
        assert row.tasks.success_rate == pytest.approx(passed / (passed + failed))
        assert row.to_dict()["costPerSuccess"] == pytest.approx(row.cost / passed, rel=1e-6)

    routes = await client.usage_report(by="route")
    by_route = {r.key: r for r in routes.rows}
    assert set(by_route) == {"small", "large"}  # an agent with one model: the model's name
    small = [*records["scout"], *records["twin"]]
    passed, failed, unknown, cost = _expected(small)
    row = by_route["small"]
    assert (row.tasks.passed, row.tasks.failed, row.tasks.unknown) == (passed, failed, unknown)
    assert row.tasks.success_rate == pytest.approx(passed / (passed + failed))
    assert isinstance(row, UsageRow)
    assert row.token_cost == pytest.approx(cost, rel=1e-6)

    classes = {r.key: r for r in (await client.usage_report(by="class")).rows}
    passed, failed, unknown, _ = _expected([*records["sage"], *records["twin"]])
    assert (classes["dear"].tasks.passed, classes["dear"].tasks.failed) == (passed, failed)

    models = await client.usage_report(by="model")
    assert agents.total is not None
    assert models.total is not None
    assert isinstance(agents.total, UsageRow)
    # Same token prices in both views; the model view leaves hours and KV out.
    assert models.total.cost == pytest.approx(agents.total.token_cost, rel=1e-6)
    assert models.total.tasks == agents.total.tasks
    large = next(r for r in models.rows if r.key == "large")
    passed, failed, unknown, cost = _expected(records["sage"])
    assert (large.tasks.passed, large.tasks.failed) == (passed, failed)
    assert large.cost == pytest.approx(cost, rel=1e-6)
    assert large.to_dict()["costPerSuccess"] == pytest.approx(cost / passed, rel=1e-6)
    days = await client.usage_report(by="day")
    assert days.total is not None
    assert days.total.cost == pytest.approx(agents.total.cost)


async def test_usage_cli_shows_success_and_says_what_is_unpriced(
    store: Store,
    env: dict[str, str],
) -> None:
    await apply(
        store,
        agent_doc("plain", GRADED, config={"llm": True}, triggers=[{"inbox": {}}]),
    )
    client = Client(store)
    async with running_daemon(store, SimEngine(), metering_flush_s=0.1):
        for body in ("ok", "bad", "ok"):
            await finished(store, "plain", f"m-{await client.send('plain', body)}")

        async def counted() -> bool:
            report = await client.usage_report(by="agent")
            return bool(report.rows) and report.rows[0].tasks.passed == 2

        await wait_until(counted, within=20, what="verdicts counted")
    home = Path(env["AGENTOS_HOME"])
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    await anyio.Path(home / "prices.yaml").write_text("per1kInputTokens: 1\n")

    table = await cli(env, "usage", "--by", "route")
    as_json = await cli(env, "usage", "--by", "model", "-o", "json")
    removed = await cli(env, "usage", "--prices", str(home / "prices.yaml"))

    assert table.returncode == 0, show(table)
    header, row, total_row = table.stdout.splitlines()
    assert header.split()[0] == "ROUTE"
    assert header.split()[-6:] == [
        *("PASS", "FAIL", "UNKNOWN", "SUCCESS", "COST/SUCCESS", "TOKENS/SUCCESS")
    ]
    assert row.split()[0] == "default"
    assert row.split()[-6:-2] == ["2", "1", "0", "66.7%"]
    assert total_row.split()[0] == "total"
    assert "prices.yaml is ignored" in table.stderr
    assert 'model "default" has no prices' in table.stderr
    assert "no QuotaPolicy declares spec.prices" in table.stderr
    assert as_json.returncode == 0, show(as_json)
    rows = json.loads(as_json.stdout)  # the rows as they were, warnings on stderr
    assert [r["key"] for r in rows] == ["default", "total"]
    assert (rows[0]["tasksPass"], rows[0]["tasksFail"], rows[0]["successRate"]) == (
        2,
        1,
        pytest.approx(2 / 3, abs=1e-6),
    )
    assert rows[0]["calls"] == 3
    assert 'model "default" has no prices' in as_json.stderr
    assert removed.returncode == 2, show(removed)
    assert "--prices was removed" in removed.stderr
