"""Task outcomes: ctx.succeed / ctx.fail, evaluators and their faults, the trace, `agentos eval`.

The agents and evaluators the daemon runs here are defined in this module (entrypoints
``tests.system.cli.test_outcomes:NAME``); the CLI's `agentos eval` imports them in its own process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import agentos
from agentos.client import Client
from agentos.client_usage import NoEvaluator
from agentos.core.errors import ClientError, NotFound
from agentos.core.lifecycle import Phase
from agentos.core.modelusage import model_usage
from agentos.core.outcomes import Outcome
from agentos.core.routespec import Evaluate
from agentos.core.taskview import EvaluatedTask, record_outcome
from agentos.engine import SimEngine
from agentos.runtime.evaluate import Evaluator, judge
from agentos.runtime.usage import UsageMeter
from agentos.store import Store
from agentos.telemetry import Telemetry
from tests.cli_support import cli, show
from tests.helpers import agent_doc, apply, finished, running_daemon, wait_until

pytestmark = pytest.mark.anyio

GRADED = "tests.system.cli.test_outcomes:Graded"
STRICT_ENV = "AGENTOS_TEST_JUDGE_STRICT"
RELEASE = threading.Event()  # lets the stuck evaluator's abandoned thread end


class Graded(agentos.Agent):
    """Answers each message and says itself whether it did its job: a body starting with
    ``ok`` succeeds, ``bad`` fails, anything else says nothing."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        if ctx.config.get("llm"):
            await ctx.llm.generate(plan.body, max_tokens=4)
        if plan.body.startswith("ok"):
            ctx.succeed(score=0.9, reason="looked fine")
        elif plan.body.startswith("bad"):
            ctx.fail("it knew it was wrong")
        return f"answer to {plan.body}"


def judge_words(task: EvaluatedTask, result: str) -> Any:
    """Fails a task whose message says "wrong", passes the rest; always agrees with none."""
    assert result == task.result
    if "wrong" in (task.message or ""):
        return {"verdict": "fail", "score": 0.1, "reason": "the message says wrong"}
    return True


def judge_strict(task: EvaluatedTask, result: str) -> str:
    """Lenient unless the environment says strict (how `agentos eval` is shown new code)."""
    return "fail" if os.environ.get(STRICT_ENV) else "pass"


async def judge_async(task: EvaluatedTask, result: str) -> float:
    await anyio.lowlevel.checkpoint()
    return 0.75


def judge_raises(task: EvaluatedTask, result: str) -> bool:
    raise RuntimeError("judge exploded \x1b[31m[bold]red[/bold]")


def judge_stuck(task: EvaluatedTask, result: str) -> bool:
    RELEASE.wait(10)
    return True


def judge_garbage(task: EvaluatedTask, result: str) -> object:
    return object()


def judge_coroutine(task: EvaluatedTask, result: str) -> Any:
    return judge_async(task, result)


@pytest.fixture(autouse=True)
def _release_stuck() -> Any:
    RELEASE.clear()
    yield
    RELEASE.set()


def _graded(name: str = "graded", **spec: Any) -> Any:
    return agent_doc(name, GRADED, triggers=[{"inbox": {}}], **spec)


async def _run(
    store: Store, agent: str, bodies: list[str], **settings: Any
) -> list[dict[str, str]]:
    """Send ``bodies`` to ``agent`` on a running daemon; their finished records, in order."""
    client = Client(store)
    records = []
    async with running_daemon(store, SimEngine(), metering_flush_s=0.1, **settings):
        for body in bodies:
            msg_id = await client.send(agent, body)
            records.append(await finished(store, agent, f"m-{msg_id}"))
        await _flushed(store, agent, len(bodies))
    return records


async def _usage(store: Store, agent: str) -> dict[str, float]:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return (await store.usage.read([agent], [day])).get((agent, day), {})


async def _flushed(store: Store, agent: str, tasks: int) -> None:
    async def counted() -> bool:
        u = await _usage(store, agent)
        return sum(u.get(f"tasks_{v}", 0.0) for v in ("pass", "fail", "unknown")) >= tasks

    await wait_until(counted, within=20, what=f"{tasks} verdicts counted")


def _outcome(record: dict[str, str]) -> dict[str, Any]:
    return dict(json.loads(record["outcome"]))


# ---------------------------------------------------------------- the agent's own verdict


async def test_ctx_succeed_and_fail_are_recorded_and_counted(store: Store) -> None:
    await apply(store, _graded(config={"llm": True}))
    ok, bad, silent = await _run(store, "graded", ["ok one", "bad two", "three"])

    assert _outcome(ok) == {
        "verdict": "pass",
        "source": "agent",
        "score": 0.9,
        "reason": "looked fine",
    }
    assert _outcome(bad) == {"verdict": "fail", "source": "agent", "reason": "it knew it was wrong"}
    assert _outcome(silent) == {"verdict": "unknown", "source": "runtime"}
    for record in (ok, bad, silent):
        assert record["status"] == "succeeded"  # a failed verdict is no crash
        assert record["models"] == "default"
        assert float(record["cost"]) == 0.0  # the daemon's engine has no prices
        assert record["counted_on"] == time.strftime("%Y-%m-%d", time.gmtime())
    usage = await _usage(store, "graded")
    assert (usage["tasks_pass"], usage["tasks_fail"], usage["tasks_unknown"]) == (1, 1, 1)
    assert (usage["model:default:pass"], usage["model:default:fail"]) == (1, 1)
    view = await Client(store).task_view("graded", ok["id"])
    assert view["outcome"]["verdict"] == "pass"


# ------------------------------------------------------------------------- evaluators


async def test_the_evaluators_verdict_is_recorded_and_wins(store: Store) -> None:
    evaluate = {"entrypoint": "tests.system.cli.test_outcomes:judge_words"}
    await apply(store, _graded(evaluate=evaluate))
    agreed, overruled = await _run(store, "graded", ["ok fine", "ok but wrong"])

    assert _outcome(agreed) == {"verdict": "pass", "source": "evaluator"}
    assert _outcome(overruled) == {
        "verdict": "fail",
        "source": "evaluator",
        "score": 0.1,
        "reason": "the message says wrong",
    }
    # The agent's own verdict is kept beside it (what `agentos eval` shows the evaluator).
    assert json.loads(overruled["agent_outcome"])["verdict"] == "pass"
    usage = await _usage(store, "graded")
    assert (usage.get("tasks_pass"), usage.get("tasks_fail")) == (1, 1)


@pytest.mark.parametrize(
    ("entrypoint", "error"),
    [
        ("tests.system.cli.test_outcomes:judge_raises", "raised RuntimeError: judge exploded"),
        ("tests.system.cli.test_outcomes:judge_stuck", "timed out after 200ms"),
        ("tests.system.cli.test_outcomes:judge_garbage", "returned no verdict"),
        ("tests.system.cli.test_outcomes:judge_coroutine", "declare it `async def`"),
        ("tests.system.cli.test_outcomes:no_such_judge", "has no function 'no_such_judge'"),
        ("tests.no_such_module:judge", "cannot import 'tests.no_such_module'"),
    ],
)
async def test_an_evaluator_that_fails_gives_unknown_and_the_agent_goes_on(
    store: Store, entrypoint: str, error: str
) -> None:
    await apply(store, _graded(evaluate={"entrypoint": entrypoint, "timeout": "200ms"}))
    first, second = await _run(store, "graded", ["ok one", "bad two"])

    for record in (first, second):
        outcome = _outcome(record)
        assert outcome["verdict"] == "unknown"
        assert outcome["source"] == "evaluator"
        assert error in outcome["error"]
        assert record["status"] == "succeeded"
    st = await store.agents.status("graded")
    assert st["phase"] != Phase.FAILED.value
    assert st.get("consecutive_failures", "0") == "0"  # no step toward a crash loop
    assert st["tasks_succeeded"] == "2"
    events = [e for e in await store.events.read("graded") if e.type == "EvaluationFailed"]
    assert len(events) == 2
    assert error in events[0].message
    usage = await _usage(store, "graded")
    assert usage["tasks_unknown"] == 2


async def test_the_verdict_is_an_evaluation_event_on_the_tasks_span(store: Store) -> None:
    spans = InMemorySpanExporter()
    telemetry = Telemetry.from_env(
        "none-but-tests", env={}, span_processors=(SimpleSpanProcessor(spans),)
    )
    await apply(
        store, _graded(evaluate={"entrypoint": "tests.system.cli.test_outcomes:judge_async"})
    )
    await apply(store, _graded("self", config={}))
    client = Client(store)
    async with running_daemon(store, SimEngine(), telemetry=telemetry):
        for agent in ("graded", "self"):
            msg_id = await client.send(agent, "ok")
            await finished(store, agent, f"m-{msg_id}")
    events = {}
    for span in spans.get_finished_spans():
        for event in span.events:
            if event.name == "gen_ai.evaluation.result":
                events[dict(span.attributes or {})["gen_ai.agent.name"]] = dict(
                    event.attributes or {}
                )
    assert events["graded"] == {
        "gen_ai.evaluation.name": "tests.system.cli.test_outcomes:judge_async",
        "gen_ai.evaluation.score.label": "pass",
        "gen_ai.evaluation.score.value": 0.75,
    }
    assert events["self"] == {
        "gen_ai.evaluation.name": "agent",
        "gen_ai.evaluation.score.label": "pass",
        "gen_ai.evaluation.score.value": 0.9,
        "gen_ai.evaluation.explanation": "looked fine",
    }


# ------------------------------------------------------------------------ agentos eval


@pytest.mark.redis_tiers  # the record and the day's usage move in one script: one slot
async def test_eval_judges_again_moves_the_counts_and_is_idempotent(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STRICT_ENV, raising=False)
    evaluate = {"entrypoint": "tests.system.cli.test_outcomes:judge_strict"}
    await apply(store, _graded(evaluate=evaluate, config={"llm": True}))
    records = await _run(store, "graded", ["one", "two", "three"])
    assert {_outcome(r)["verdict"] for r in records} == {"pass"}
    before = await _usage(store, "graded")
    assert before["tasks_pass"] == 3

    monkeypatch.setenv(STRICT_ENV, "1")  # the evaluator's code changed
    client = Client(store)
    report = await client.evaluate_tasks("graded")
    assert [(r.task_id, r.old, r.new.verdict) for r in report.rows] == [
        (r["id"], "pass", "fail") for r in records
    ]
    assert report.to_dict()["summary"] == {
        "judged": 3,
        "pass": 0,
        "fail": 3,
        "unknown": 0,
        "changed": 3,
        "skipped": 0,
        "successRate": 0.0,
    }
    after = await _usage(store, "graded")
    assert (after["tasks_pass"], after["tasks_fail"]) == (0, 3)
    assert (after["model:default:pass"], after["model:default:fail"]) == (0, 3)
    assert after["tokens_in"] == before["tokens_in"]  # only the verdicts moved

    again = await client.evaluate_tasks("graded")
    assert [r.changed for r in again.rows] == [False] * 3
    assert await _usage(store, "graded") == after
    stored = await store.tasks.get("graded", records[0]["id"])
    assert _outcome(stored)["verdict"] == "fail"

    one = await client.evaluate_tasks("graded", task_id=records[0]["id"])
    assert len(one.rows) == 1
    recent = await client.evaluate_tasks("graded", since_s=3600)
    assert len(recent.rows) == 3


async def test_eval_refuses_what_it_cannot_judge_and_changes_nothing(store: Store) -> None:
    await apply(
        store,
        _graded(),
        _graded("judged", evaluate={"entrypoint": "tests.no_such_module:judge"}),
    )
    records = await _run(store, "graded", ["ok"])
    client = Client(store)
    with pytest.raises(NoEvaluator, match=r"declares no spec\.evaluate"):
        await client.evaluate_tasks("graded")
    with pytest.raises(NoEvaluator, match=r"cannot import 'tests\.no_such_module'"):
        await client.evaluate_tasks("judged")
    with pytest.raises(NotFound):
        await client.evaluate_tasks("nobody")
    await apply(
        store, _graded(evaluate={"entrypoint": "tests.system.cli.test_outcomes:judge_strict"})
    )
    with pytest.raises(NotFound, match="no task"):
        await client.evaluate_tasks("graded", task_id="m-0-0")
    assert await store.tasks.get("graded", records[0]["id"]) == records[0]


async def test_eval_cli_prints_old_and_new_verdicts_escaped(
    store: Store,
    env: dict[str, str],
) -> None:
    await apply(
        store, _graded(evaluate={"entrypoint": "tests.system.cli.test_outcomes:judge_strict"})
    )
    (record,) = await _run(store, "graded", ["ok"])
    strict = {**env, STRICT_ENV: "1"}
    table = await cli(strict, "eval", "graded")
    as_json = await cli(strict, "eval", "graded", "-o", "json")
    missing = await cli(env, "eval", "nobody")

    assert table.returncode == 0, show(table)
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["TASK", "OLD", "NEW", "SCORE", "REASON"]
    assert row.split()[:3] == [record["id"], "pass", "fail"]
    assert "1 changed" in table.stdout
    assert as_json.returncode == 0, show(as_json)
    data = json.loads(as_json.stdout)
    assert data["tasks"] == [
        {
            "taskId": record["id"],
            "old": "fail",
            "new": "fail",
            "score": None,
            "reason": None,
            "error": None,
            "changed": False,
        }
    ]
    assert missing.returncode == 1, show(missing)
    assert 'agent "nobody" not found' in missing.stderr


async def test_eval_cli_escapes_the_evaluators_error(
    store: Store,
    env: dict[str, str],
) -> None:
    await apply(
        store, _graded(evaluate={"entrypoint": "tests.system.cli.test_outcomes:judge_raises"})
    )
    await _run(store, "graded", ["ok"])
    proc = await cli(env, "eval", "graded")
    assert proc.returncode == 0, show(proc)
    assert "\x1b" not in proc.stdout
    assert "\\x1b[31m[bold]red[/bold]" in proc.stdout  # shown as text, not as colour


# -------------------------------------------------------------------------- unit tests


def _task(**fields: Any) -> EvaluatedTask:
    record = {"id": "t1", "trigger": "inbox", "status": "succeeded", "result": "42", **fields}
    return EvaluatedTask.from_record("a", record)


@pytest.mark.parametrize(
    ("fn", "verdict", "score"),
    [
        (lambda t, r: True, "pass", None),
        (lambda t, r: "fail", "fail", None),
        (lambda t, r: 0.2, "fail", 0.2),
        (lambda t, r: {"pass": True, "reason": "ok"}, "pass", None),
        (lambda t, r: Outcome("pass", 1.0, source="agent"), "pass", 1.0),
        (judge_async, "pass", 0.75),
    ],
)
async def test_judge_takes_every_kind_of_verdict(fn: Any, verdict: str, score: Any) -> None:
    outcome = await judge(fn, _task(), timeout_s=5)
    assert (outcome.verdict, outcome.score, outcome.source, outcome.error) == (
        verdict,
        score,
        "evaluator",
        None,
    )


async def test_judge_contains_every_failure() -> None:
    assert "raised RuntimeError" in str((await judge(judge_raises, _task(), timeout_s=5)).error)
    assert "no verdict" in str((await judge(lambda t, r: float("nan"), _task(), timeout_s=5)).error)
    assert "no verdict" in str((await judge(lambda t, r: "maybe", _task(), timeout_s=5)).error)
    started = time.monotonic()
    stuck = await judge(judge_stuck, _task(), timeout_s=0.1)
    assert stuck.verdict == "unknown"
    assert "timed out" in str(stuck.error)
    assert time.monotonic() - started < 2


async def test_an_evaluator_that_cannot_load_is_unknown_not_an_error() -> None:
    evaluator = Evaluator(Evaluate(entrypoint="tests.system.cli.test_outcomes:nothing_here"))
    outcome = await evaluator.judge(_task())
    assert outcome.verdict == "unknown"
    assert "has no function 'nothing_here'" in str(outcome.error)


def test_the_evaluated_task_is_what_the_record_keeps() -> None:
    agent_said = json.dumps({"verdict": "pass", "source": "agent"})
    task = _task(message_id="1-0", payload="question?", attempt="2", outcome=agent_said)
    assert (task.message, task.result, task.attempt) == ("question?", "42", 2)
    assert task.outcome == Outcome("pass", source="agent")
    judged = json.dumps({"verdict": "fail", "source": "evaluator"})
    assert _task(outcome=judged).outcome is None  # not the agent's: none of its own
    assert _task(outcome=judged, agent_outcome=agent_said).outcome == Outcome("pass")
    assert _task().message is None  # a trigger, not a message, started it


@pytest.mark.parametrize(
    ("record", "verdict"),
    [
        ({"status": "failed", "error": "boom"}, "fail"),
        ({"status": "dead", "error": "boom"}, "fail"),
        ({"status": "succeeded"}, None),
        ({"status": "succeeded", "outcome": "not json"}, None),
        ({"status": "succeeded", "outcome": '{"verdict": "pass"}'}, "pass"),
    ],
)
def test_record_outcome(record: dict[str, str], verdict: str | None) -> None:
    outcome = record_outcome(record)
    assert (outcome.verdict if outcome is not None else None) == verdict


def test_the_meter_credits_the_model_of_the_last_call_and_counts_failures() -> None:
    meter = UsageMeter("a", time.time, Telemetry.disabled())
    meter.begin_task()
    meter.add(**model_usage("small", tokens_in=1, cached=0, tokens_out=1))
    meter.add(**model_usage("large", tokens_in=1, cached=0, tokens_out=1))
    meter.judged("pass")
    assert meter.served == ("small", "large")
    meter.begin_task()
    meter.add(tasks_failed=1)  # a task that failed is a fail verdict, with no model
    _, amounts = meter.delta(Phase.IDLE)
    assert amounts["tasks_pass"] == 1
    assert amounts["model:large:pass"] == 1
    assert "model:small:pass" not in amounts
    assert amounts["tasks_fail"] == 1
    assert not any(k.endswith(":fail") for k in amounts if k.startswith("model:"))


async def test_a_task_of_another_status_is_not_judged_again(store: Store) -> None:
    await apply(
        store, _graded(evaluate={"entrypoint": "tests.system.cli.test_outcomes:judge_strict"})
    )
    (record,) = await _run(store, "graded", ["ok"])
    ok, why = await store.tasks.set_outcome(
        "graded", record["id"], outcome="{}", verdict="pass", day="1999-01-01"
    )
    assert (ok, why) == (False, "day")
    await store.conn.r.hset(store.keys.task("graded", record["id"]), "status", "failed")
    with pytest.raises(ClientError, match="is failed"):
        await Client(store).evaluate_tasks("graded", task_id=record["id"])
