"""Durable waits end to end with an in-process daemon: ask, answer, timeout, events, sleep."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from agentos.client import AnswerRejected, Client
from agentos.daemon import Daemon
from agentos.engine import SimEngine
from agentos.ingress import build_app
from agentos.settings import DaemonSettings
from agentos.store import Store
from tests.helpers import (
    FAST,
    agent_doc,
    apply,
    policy_doc,
    running_daemon,
    status_is,
    wait_until,
)

INBOX = {"triggers": [{"inbox": {}}]}

pytestmark = pytest.mark.anyio


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def waiting_task(store: Store, name: str) -> str:
    async def parked() -> str | None:
        st = await store.agents.status(name)
        if st.get("phase") != "Waiting":
            return None
        wait = await store.waits.get(name)
        return wait.task_id if wait is not None else None

    return str(await wait_until(parked, within=15, what=f"{name} to wait"))


async def done(store: Store, name: str, task: str) -> dict[str, str]:
    async def finished() -> dict[str, str] | None:
        rec = await store.tasks.get(name, task)
        return rec if rec.get("status") in ("succeeded", "failed") else None

    return dict(await wait_until(finished, within=15, what=f"task {task} to finish"))


async def test_ask_parks_releases_and_resumes_with_the_answer(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log"
    await apply(
        store,
        agent_doc(
            "appr", "tests.wait_agents:Approver", triggers=[{"inbox": {}}], config={"log": str(log)}
        ),
    )
    client = Client(store)
    async with running_daemon(store) as d:
        await client.send("appr", "deploy")
        task = await waiting_task(store, "appr")
        # Released: no runner, no lease, no engine session.
        await wait_until(lambda: _gone(d, "appr"), what="the runner to end")
        assert await store.leases.read(["appr"]) == {}
        assert not d.engine.has_session("appr")
        (pending,) = await client.pending()
        assert (pending.agent, pending.task_id, pending.choices) == ("appr", task, ("yes", "no"))
        assert (await store.tasks.get("appr", task))["status"] == "waiting"
        with pytest.raises(AnswerRejected) as bad:
            await client.answer("appr", task, choice="maybe", by="op")
        assert bad.value.code == "invalid"
        with pytest.raises(AnswerRejected) as wrong:
            await client.answer("appr", "nope", yes=True, by="op")
        assert wrong.value.code == "not_waiting"
        assert (await store.waits.get("appr")).answer is None  # nothing changed
        await client.answer("appr", task, yes=True, by="alice")
        with pytest.raises(AnswerRejected) as second:
            await client.answer("appr", task, no=True, by="bob")
        assert second.value.code in ("answered", "not_waiting")
        record = await done(store, "appr", task)
    assert record["status"] == "succeeded"
    assert record["result"] == "deploy: yes"
    assert record["answered_by"] == "alice"
    assert lines(log) == ["before deploy", "before deploy", "after yes"]
    assert await store.waits.get("appr") is None
    # Released when the daemon stopped: due only on its next message (no time trigger).
    assert await store.waits.due_scan() == {"appr": math.inf}
    types = [e.type for e in await store.events.read("appr")]
    assert "Waiting" in types
    assert "Answered" in types


async def _gone(d: object, name: str) -> bool:
    return name not in d.runners  # type: ignore[attr-defined]


def approver(log: Path, **config: object) -> object:
    return agent_doc(
        "appr",
        "tests.wait_agents:Approver",
        triggers=[{"inbox": {}}],
        config={"log": str(log), **config},
    )


@pytest.mark.parametrize(
    ("config", "result", "last"),
    [
        ({"timeout": 0.5, "default": "no"}, "deploy: no", "after no"),
        ({"timeout": "500ms"}, "timed out", "timeout"),
    ],
    ids=["default", "WaitTimeout"],
)
async def test_a_deadline_returns_the_default_or_raises_wait_timeout(
    store: Store, tmp_path: Path, config: dict[str, object], result: str, last: str
) -> None:
    log = tmp_path / "log"
    await apply(store, approver(log, **config))
    async with running_daemon(store):
        msg = await Client(store).send("appr", "deploy")
        record = await done(store, "appr", f"m-{msg}")
    assert record["status"] == "succeeded"
    assert record["result"] == result
    assert record["wait_outcome"] == "timeout"
    assert record["answered_by"] == "deadline"
    assert lines(log) == ["before deploy", "before deploy", last]


async def test_answers_and_model_calls_replay_in_order(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log"
    await apply(
        store,
        agent_doc(
            "two",
            "tests.wait_agents:TwoQuestions",
            triggers=[{"inbox": {}}],
            config={"log": str(log)},
        ),
    )
    client = Client(store)
    async with running_daemon(store):
        msg = await client.send("two", "hello")
        task = await waiting_task(store, "two")
        await client.answer("two", task, choice="a", by="op")
        await wait_until(lambda: _question_is(store, "two", "second?"), what="the second question")
        with pytest.raises(AnswerRejected):  # free text: a choice does not fit
            await client.answer("two", task, yes=True, by="op")
        await client.answer("two", task, text="fine", by="op")
        record = await done(store, "two", f"m-{msg}")
    assert record["status"] == "succeeded"
    assert record["result"].startswith("a/fine/")
    # Each model call ran once; the re-runs were served from the record.
    assert lines(log) == ["llm1 1", "llm1 0", "llm2 1", "llm1 0", "llm2 0", "done a fine"]


async def _question_is(store: Store, name: str, question: str) -> bool:
    wait = await store.waits.get(name)
    return wait is not None and wait.question == question


async def test_an_event_wait_is_ended_by_another_agents_send_event(
    store: Store, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    await apply(
        store,
        agent_doc(
            "waiter",
            "tests.wait_agents:EventWaiter",
            triggers=[{"inbox": {}}],
            config={"log": str(log)},
        ),
        agent_doc(
            "sender",
            "tests.wait_agents:EventSender",
            triggers=[{"inbox": {}}],
            config={"to": "waiter"},
        ),
    )
    client = Client(store)
    async with running_daemon(store):
        msg = await client.send("waiter", "build-done")
        await waiting_task(store, "waiter")
        sent = await client.send("sender", "build-done")
        record = await done(store, "waiter", f"m-{msg}")
        assert (await done(store, "sender", f"m-{sent}"))["result"] == "sent, ended a wait: True"
    assert record["result"] == "got {'from': 'sender'}"
    assert record["answered_by"] == "agent:sender"
    assert lines(log) == ["waiting", "waiting", "got {'from': 'sender'}"]


async def test_an_event_sent_before_the_wait_is_kept_for_it(store: Store, tmp_path: Path) -> None:
    await apply(
        store, agent_doc("waiter", "tests.wait_agents:EventWaiter", triggers=[{"inbox": {}}])
    )
    client = Client(store)
    assert await client.send_event("waiter", "go", 7, by="ci") is False
    async with running_daemon(store):
        msg = await client.send("waiter", "go")
        record = await done(store, "waiter", f"m-{msg}")
    assert record["result"] == "got 7"
    assert record["answered_by"] == "ci"


async def test_sleep_resumes_after_its_time(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log"
    await apply(
        store,
        agent_doc(
            "sleepy",
            "tests.wait_agents:Sleeper",
            triggers=[{"inbox": {}}],
            config={"log": str(log)},
        ),
    )
    async with running_daemon(store):
        msg = await Client(store).send("sleepy", "1s")
        await waiting_task(store, "sleepy")
        record = await done(store, "sleepy", f"m-{msg}")
    assert record["wait_outcome"] == "woke"
    assert float(record["waited_s"]) >= 0.9
    assert lines(log) == ["sleeping", "sleeping", "awake"]


async def test_a_deadline_fires_on_another_daemon_after_a_restart(
    store: Store, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    await apply(store, approver(log, timeout=2, default="no"))
    async with running_daemon(store, daemon_id="first"):
        msg = await Client(store).send("appr", "deploy")
        await waiting_task(store, "appr")
    async with running_daemon(store, daemon_id="second"):
        record = await done(store, "appr", f"m-{msg}")
    assert record["result"] == "deploy: no"
    (timed_out,) = [e for e in await store.events.read("appr") if e.type == "WaitTimedOut"]
    assert timed_out.daemon == "second"
    assert lines(log)[-1] == "after no"


JSON = {"Content-Type": "application/json"}


def http(store: Store, token: str | None) -> httpx.AsyncClient:
    app = build_app(Client(store), token=token, ready=lambda: True)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


async def test_http_answers_need_the_token_and_fit_the_question(
    store: Store, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    await apply(store, approver(log))
    auth = {"Authorization": "Bearer s3cret"}
    async with running_daemon(store), http(store, "s3cret") as c:
        msg = await Client(store).send("appr", "pay")
        task = await waiting_task(store, "appr")
        url = f"/v1/agents/appr/tasks/{task}/answer"
        assert (await c.get("/v1/pending")).status_code == 401
        r = await c.post(url, json={"yes": True})
        assert r.status_code == 401
        assert (await store.waits.get("appr")).answer is None
        (listed,) = (await c.get("/v1/pending", headers=auth)).json()
        assert (listed["task"], listed["choices"]) == (task, ["yes", "no"])
        bad = await c.post(url, json={"choice": "later"}, headers=auth)
        assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid")
        assert (await c.post(url, content=b"{", headers={**auth, **JSON})).status_code == 400
        assert (await store.waits.get("appr")).answer is None
        ok = await c.post(url, json={"no": True, "by": "carol"}, headers=auth)
        assert ok.status_code == 200
        assert ok.json()["by"] == "carol (http:token)"
        again = await c.post(url, json={"yes": True}, headers=auth)
        assert again.status_code == 409
        record = await done(store, "appr", f"m-{msg}")
        gone = await c.post(url, json={"yes": True}, headers=auth)
        assert (gone.status_code, gone.json()["error"]["code"]) == (409, "not_waiting")
    assert record["result"] == "pay: no"
    assert record["answered_by"] == "carol (http:token)"
    assert lines(log) == ["before pay", "before pay", "after no"]


async def test_http_events_end_a_wait(store: Store) -> None:
    await apply(
        store, agent_doc("waiter", "tests.wait_agents:EventWaiter", triggers=[{"inbox": {}}])
    )
    async with running_daemon(store), http(store, None) as c:
        msg = await Client(store).send("waiter", "ready")
        await waiting_task(store, "waiter")
        r = await c.post("/v1/agents/waiter/events/ready", json={"n": 1})
        assert (r.status_code, r.json()["endedWait"]) == (202, True)
        record = await done(store, "waiter", f"m-{msg}")
    assert record["result"] == "got {'n': 1}"
    assert record["answered_by"] == "http:loopback"


# ------------------------------------------------------------------------ budgets


def tiny_policy(daily_tokens: int) -> dict[str, object]:
    return {
        "apiVersion": "agentos/v1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "tight"},
        "spec": {"timezone": "UTC", "classes": {"tiny": {"dailyTokens": daily_tokens}}},
    }


async def _spent(store: Store, d: Daemon, client: Client) -> str:
    await apply(store, policy_doc(tiny_policy(5)))

    async def known() -> bool:  # the daemon enforces the class (its refresh may lag)
        return d.governor.quota_of("tiny") is not None

    await wait_until(known, what="the daemon to know the class")
    await apply(
        store, agent_doc("spender", "tests.fixture_agents:Parity", quotaClass="tiny", **INBOX)
    )
    await client.send("spender", "0")  # spends the day's budget
    await wait_until(lambda: status_is(store, "spender", tasks_succeeded="1"))
    msg = await client.send("spender", "2")
    await wait_until(lambda: status_is(store, "spender", phase="Waiting", reason="BudgetExhausted"))
    await wait_until(lambda: _gone(d, "spender"), what="the runner to end")
    assert not d.engine.has_session("spender")
    assert await store.leases.read(["spender"]) == {}
    record = await store.tasks.get("spender", f"m-{msg}")
    assert (record["status"], record["wait_kind"]) == ("parked", "budget")
    with pytest.raises(AnswerRejected, match="waits for budget"):
        await client.answer("spender", f"m-{msg}", yes=True, by="op")
    return f"m-{msg}"


@asynccontextmanager
async def clocked_daemon(store: Store, clock: list[float]) -> AsyncIterator[Daemon]:
    settings = DaemonSettings(**{**FAST, "quota_refresh_s": 0.1})
    d = Daemon(store, SimEngine(), settings, clock=lambda: clock[0])
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        try:
            yield d
        finally:
            d.request_stop()


async def test_a_spent_budget_parks_the_task_until_the_day_ends(store: Store) -> None:
    # The next UTC midnight, a minute before it: the budget day ends in a minute. Ahead of
    # the real clock, never behind it: a send makes an agent due at the sender's time.
    midnight = (time.time() // 86_400 + 2) * 86_400
    clock = [midnight - 60.0]
    client = Client(store)
    async with clocked_daemon(store, clock) as d:
        task = await _spent(store, d, client)
        wait = await store.waits.get("spender")
        assert wait is not None
        assert wait.deadline == pytest.approx(midnight, abs=1.0)
        # Not activated before the day ends on the daemon's clock (a few index polls:
        # three passes of its keeper, one every third of a lease, span a whole lease).
        passes = d.keeper.passes
        await wait_until(lambda: d.keeper.passes >= passes + 3, what="three keeper passes")
        still = await store.waits.get("spender")
        assert still is not None
        assert still.park_id == wait.park_id
        assert (await store.agents.status("spender"))["phase"] == "Waiting"
        clock[0] = midnight + 1.0  # the next day
        record = await done(store, "spender", task)
    assert record["status"] == "succeeded"
    assert record["wait_outcome"] == "rollover"
    assert "BudgetRenewed" in [e.type for e in await store.events.read("spender")]


async def test_a_raised_policy_resumes_a_task_parked_on_its_budget(store: Store) -> None:
    client = Client(store)
    async with running_daemon(store, quota_refresh_s=0.1) as d:
        task = await _spent(store, d, client)

        async def warned() -> list[object]:
            return [e for e in await store.events.read(None) if e.type == "BudgetWarning"]

        (warning,) = await wait_until(warned, what="the budget warning")
        assert warning.reason == "tiny"
        assert "of its dailyTokens" in warning.message
        await apply(store, policy_doc(tiny_policy(1_000_000)))
        record = await done(store, "spender", task)
    assert record["status"] == "succeeded"
    assert record["wait_outcome"] == "released"
    assert record["answered_by"] == "policy"


async def test_each_wait_is_an_agentos_wait_span(store: Store, tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentos.telemetry import Telemetry

    exporter = InMemorySpanExporter()
    telemetry = Telemetry.from_env(
        "tests", env={}, span_processors=(SimpleSpanProcessor(exporter),)
    )
    await apply(store, approver(tmp_path / "log"))
    client = Client(store)
    async with running_daemon(store, telemetry=telemetry):
        msg = await client.send("appr", "deploy")
        task = await waiting_task(store, "appr")
        await client.answer("appr", task, yes=True, by="dora")
        await done(store, "appr", f"m-{msg}")
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "agentos.wait"]
    attrs = dict(span.attributes or {})
    assert attrs["agentos.wait.kind"] == "ask"
    assert attrs["agentos.wait.outcome"] == "answered"
    assert attrs["agentos.wait.answered_by"] == "dora"
    assert float(attrs["agentos.wait.waited_s"]) >= 0  # type: ignore[arg-type]
    assert "agentos.wait.question" not in attrs  # content capture is off
    tasks = [s for s in exporter.get_finished_spans() if s.name.startswith("invoke_agent")]
    assert any((s.attributes or {}).get("agentos.task.waiting") == "ask" for s in tasks)


async def test_deleting_a_waiting_agent_forgets_its_wait(store: Store, tmp_path: Path) -> None:
    await apply(store, approver(tmp_path / "log"))
    client = Client(store)
    async with running_daemon(store) as d:
        await client.send("appr", "deploy")
        await waiting_task(store, "appr")
        await client.delete_agent("appr")

        async def forgotten() -> bool:
            return await store.waits.get("appr") is None and not await store.waits.due_scan()

        await wait_until(forgotten, what="the wait to be purged")
        assert "appr" not in d.runners
    assert await client.pending() == []


async def test_a_resumed_task_gets_its_whole_message_back(store: Store, tmp_path: Path) -> None:
    body = "deploy " + "x" * 1000  # far past the record's 200-character preview
    await apply(
        store,
        agent_doc(
            "late",
            "tests.wait_agents:LateAsker",
            triggers=[{"inbox": {}}],
        ),
    )
    client = Client(store)
    async with running_daemon(store):
        await client.send("late", body)
        task = await waiting_task(store, "late")
        await client.answer("late", task, yes=True, by="alice")
        record = await done(store, "late", task)
    assert record["result"] == f"{body}: yes"
