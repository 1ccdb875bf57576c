"""spec.limits: a task past taskTimeout, maxSteps or maxTokensPerTask ends failed with the
limit in its reason and an event; the agent is not restarted and the next task runs."""

from __future__ import annotations

from typing import Any

import pytest

from agentos.client import Client
from agentos.core.spec import SpecError, parse_text
from agentos.store import Store
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = [pytest.mark.anyio]


async def ended(store: Store, agent: str, task: str) -> dict[str, str]:
    async def done() -> dict[str, str] | None:
        record = await store.tasks.get(agent, task)
        return record if record.get("status") in ("succeeded", "failed", "dead") else None

    record: dict[str, str] = await wait_until(done, within=30, what=f"task {task} to end")
    return record


async def limited(store: Store, entrypoint: str, limits: dict[str, Any], **spec: Any) -> Any:
    await apply(
        store,
        agent_doc("runaway", entrypoint, triggers=[{"inbox": {}}], limits=limits, **spec),
    )
    client = Client(store)
    async with running_daemon(store):
        first = await client.send("runaway", "go")
        record = await ended(store, "runaway", f"m-{first}")
        events = [e for e in await store.events.read("runaway") if e.type == "TaskLimitExceeded"]
        status = await store.agents.status("runaway")
    return record, events, status


async def test_max_steps_stops_a_loop_that_never_ends(store: Store) -> None:
    record, events, status = await limited(
        store, "tests.fixture_agents:Counter", {"maxSteps": 3}, config={"limit": 100}
    )
    assert record["status"] == "failed"
    assert record["error"] == "maxSteps: still had work after 3 loop iterations"
    assert {e.reason for e in events} == {"maxSteps"}  # the start task's too
    assert int(status.get("restarts") or 0) == 0
    assert status.get("phase") != "Failed"


async def test_task_timeout_stops_a_task_that_never_returns(store: Store) -> None:
    record, events, _ = await limited(
        store, "tests.fixture_agents:Slow", {"taskTimeout": "300ms"}, config={"sleep": 60}
    )
    assert record["status"] == "failed"
    assert record["error"] == "taskTimeout: ran past 300ms"
    assert {e.reason for e in events} == {"taskTimeout"}


async def test_max_tokens_stops_a_runaway_that_swallows_errors(store: Store) -> None:
    record, events, _status = await limited(
        store, "tests.fixture_agents:Swallower", {"maxTokensPerTask": 60}
    )
    assert record["status"] == "failed"
    assert record["error"].startswith("maxTokensPerTask: used ")
    assert record["error"].endswith("the limit is 60")
    assert {e.reason for e in events} == {"maxTokensPerTask"}
    used = int(record["tokens_in"]) + int(record["tokens_out"])
    assert 60 < used < 200  # stopped at the first call past the limit


async def test_the_next_task_runs_after_a_limited_one(store: Store) -> None:
    await apply(
        store,
        agent_doc(
            "runaway",
            "tests.fixture_agents:Counter",
            triggers=[{"inbox": {}}],
            limits={"maxSteps": 2},
            config={"limit": 2},
        ),
    )
    client = Client(store)
    async with running_daemon(store):
        first = await client.send("runaway", "one")
        assert (await ended(store, "runaway", f"m-{first}"))["status"] == "succeeded"
        second = await client.send("runaway", "two")
        record = await ended(store, "runaway", f"m-{second}")
        await wait_until(lambda: status_is(store, "runaway", phase="Idle"), what="idle")
    assert record["status"] == "succeeded"  # observe found nothing more: not limited
    assert await store.inbox.depth("runaway") == 0


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ("{maxSteps: 0}", "spec.limits.maxSteps"),
        ("{taskTimeout: soon}", "spec.limits.taskTimeout"),
        ("{maxTokensPerTask: many}", "spec.limits.maxTokensPerTask"),
        ("{maxTurns: 3}", "spec.limits.maxTurns"),
    ],
)
def test_bad_limits_are_refused_at_their_line(limits: str, message: str) -> None:
    text = (
        "apiVersion: agentos/v1\nkind: Agent\nmetadata:\n  name: a\nspec:\n"
        f"  entrypoint: m:A\n  limits: {limits}\n"
    )
    with pytest.raises(SpecError) as e:
        parse_text(text, source="a.yaml")
    assert any(i.line == 7 and i.path.startswith(message) for i in e.value.issues), e.value
