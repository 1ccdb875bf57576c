"""Isolation: agent code that blocks the event loop is found, named and charged to its agent,
and never costs the daemon's other agents their leases; a task whose every start is cut
short ends after ``crashLoopAfter`` starts."""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import agentos
from agentos.client import Client
from agentos.runtime.watchdog import LoopWatchdog, Mark, locate, marked, running
from agentos.store import Store
from tests.fixture_agents import LOOP_BLOCKED
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

BLOCKER = "tests.integration.runtime.test_watchdog:Blocker"
STUCK = "tests.integration.runtime.test_watchdog:Stuck"
ECHO = "tests.fixture_agents:Echo"
INBOX = {"triggers": [{"inbox": {}}]}


class Blocker(agentos.Agent):
    """Blocks the event loop in act for ``config.block_s`` seconds (the mistake of an
    agent whose "shell tool" is ``subprocess.run``)."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        LOOP_BLOCKED.set()
        # A synchronous wait on the loop's thread: BlockedLoop names this line.
        threading.Event().wait(float(ctx.config.get("block_s", 6)))
        return "done"


class Stuck(agentos.Agent):
    """Never finishes a task (its daemon stops, or dies, in the middle of every one)."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await anyio.sleep_forever()


def _blocking_line() -> str:
    lines, first = inspect.getsourcelines(Blocker.act)
    offset = next(i for i, line in enumerate(lines) if "Event().wait" in line)
    return f"tests/integration/runtime/test_watchdog.py:{first + offset}"


async def _events(store: Store, name: str, type_: str) -> list[Any]:
    return [e for e in await store.events.read(name, count=200) if e.type == type_]


async def test_a_blocked_loop_is_charged_to_the_blocker_and_the_others_keep_their_leases(
    store: Store, redis_url: str, namespace: str
) -> None:
    # The case is a 20 s block with 15 s leases; 6 s with 2 s leases is the same
    # case (the loop is blocked for three lease lifetimes) in a third of the time.
    await apply(
        store,
        agent_doc(
            "blocker",
            BLOCKER,
            config={"block_s": 6},
            restartPolicy={"crashLoopAfter": 2},
            **INBOX,
        ),
        agent_doc("echo-a", ECHO, **INBOX),
        agent_doc("echo-b", ECHO, **INBOX),
    )
    client = Client(store)
    LOOP_BLOCKED.clear()
    echoes = ("echo-a", "echo-b")
    sent: dict[str, list[str]] = {n: [] for n in echoes}

    def send_meanwhile() -> None:
        # From a thread with its own loop and connection: the daemon's loop (and this
        # test's) is blocked while these are sent.
        async def send() -> None:
            other = await Store.connect(redis_url, namespace=namespace)
            try:
                for i in range(8):
                    for n in echoes:
                        sent[n].append(await Client(other).send(n, f"during {i}"))
            finally:
                await other.close()

        assert LOOP_BLOCKED.wait(timeout=30), "the blocker never ran"
        anyio.run(send)

    async with running_daemon(store, lease_ttl_s=2.0) as d:
        for n in echoes:
            sent[n].append(await client.send(n, "before"))
        for n in echoes:
            await wait_until(lambda n=n: status_is(store, n, tasks_succeeded="1"), within=20)
        runners = {n: d.runners[n] for n in echoes}
        sender = threading.Thread(target=send_meanwhile)
        sender.start()
        blocked = await client.send("blocker", "block")
        await wait_until(lambda: _events(store, "blocker", "BlockedLoop"), within=30)
        await anyio.to_thread.run_sync(sender.join)

        async def all_handled() -> bool:
            for n in echoes:
                for msg_id in sent[n]:
                    if (await store.tasks.get(n, f"m-{msg_id}")).get("status") != "succeeded":
                        return False
            return True

        await wait_until(all_handled, within=30, what="every echo message handled")
        # The other two kept their runner, their lease and their single start.
        assert {n: d.runners.get(n) for n in echoes} == runners
        for n in echoes:
            assert not await _events(store, n, "LeaseLost")
            assert len(await _events(store, n, "Started")) == 1
            assert len(sent[n]) == 9
        (event,) = await _events(store, "blocker", "BlockedLoop")
        assert event.reason == _blocking_line()
        assert _blocking_line() in event.message
        seconds = float(event.message.split("for ")[1].split("s ")[0])
        assert 4.0 <= seconds < 30
        record = await wait_until(
            lambda: _task_with(store, "blocker", f"m-{blocked}", status="succeeded")
        )
        assert 1 <= int(record["attempt"]) <= 2  # started at most crashLoopAfter times
        status = await store.agents.status("blocker")
        assert status["consecutive_failures"] == "1"
        assert not await _events(store, "blocker", "LeaseLost")


async def _task_with(store: Store, name: str, task_id: str, **fields: str) -> dict[str, str]:
    record = await store.tasks.get(name, task_id)
    return record if all(record.get(k) == v for k, v in fields.items()) else {}


async def test_an_agent_that_keeps_blocking_the_loop_ends_in_crash_loop_without_reruns(
    store: Store,
) -> None:
    await apply(
        store,
        agent_doc(
            "blocker",
            BLOCKER,
            config={"block_s": 1.0},
            restartPolicy={"crashLoopAfter": 2},
            **INBOX,
        ),
    )
    client = Client(store)
    async with running_daemon(store, blocked_loop_s=0.4):
        first = await client.send("blocker", "one")
        await wait_until(lambda: status_is(store, "blocker", consecutive_failures="1"), within=20)
        second = await client.send("blocker", "two")
        await wait_until(
            lambda: status_is(store, "blocker", phase="Failed", reason="CrashLoop"), within=20
        )
    for msg_id in (first, second):
        record = await store.tasks.get("blocker", f"m-{msg_id}")
        assert record["status"] == "succeeded"  # done once, never run again
        assert record["attempt"] == "1"
    assert len(await _events(store, "blocker", "BlockedLoop")) == 2


async def test_a_task_whose_every_start_is_cut_short_fails_after_crash_loop_after_starts(
    store: Store,
) -> None:
    await apply(store, agent_doc("stuck", STUCK, restartPolicy={"crashLoopAfter": 2}, **INBOX))
    msg = await Client(store).send("stuck", "never finishes")
    task_id = f"m-{msg}"
    for start in (1, 2):
        # Each daemon stops while the task runs (cut short after the grace period): the
        # same as a daemon that dies, or loses control of its agents, mid-task.
        async with running_daemon(store, grace_s=0.3):
            await wait_until(
                lambda start=start: _task_with(
                    store, "stuck", task_id, status="running", attempt=str(start)
                ),
                within=20,
                what=f"start {start}",
            )
    async with running_daemon(store, grace_s=0.3):
        record = await wait_until(
            lambda: _task_with(store, "stuck", task_id, status="dead"), within=20
        )
        await wait_until(lambda: status_is(store, "stuck", phase="Idle"), within=20)
    assert "started 2 time(s) without finishing" in record["error"]
    assert record["attempt"] == "2"
    assert await store.inbox.depth("stuck") == 0  # out of the inbox: never redelivered
    (letter,) = await store.poison.dead_letters("stuck")  # kept, to look at or re-drive
    assert letter["task"] == task_id
    (event,) = await _events(store, "stuck", "DeadLettered")
    assert task_id in event.message


def test_the_watchdog_names_the_agents_own_frame_not_the_runtimes() -> None:
    mark = Mark("blocker", __name__)
    frame = sys._getframe()
    stall, line = locate(frame, mark), frame.f_lineno
    assert stall.agent == "blocker"
    # path/module.py:LINE, from the module's dotted name (pytest imports this file as
    # test_watchdog; the daemon, by its entrypoint, as tests.integration.runtime.test_watchdog).
    assert stall.where == f"{__name__.replace('.', '/')}.py:{line}"
    # Without an agent frame on the stack (agentos's own code blocked): nobody is charged.
    assert locate(frame, Mark("other", "someone_else.agent")).agent is None


async def test_the_mark_is_set_only_while_the_agents_coroutine_runs() -> None:
    from agentos.runtime import watchdog

    me = threading.get_ident()
    seen: list[Mark | None] = []

    async def agent_code() -> str:
        seen.append(watchdog._RUNNING.get(me))
        await anyio.lowlevel.checkpoint()
        seen.append(watchdog._RUNNING.get(me))
        return "ok"

    mark = Mark("a", "pkg.mod")
    assert await marked(mark, agent_code()) == "ok"
    assert seen == [mark, mark]
    assert me not in watchdog._RUNNING
    with running(mark):
        assert watchdog._RUNNING[me] == mark
    assert me not in watchdog._RUNNING


def test_the_watchdog_measures_a_stall_and_reports_it_once() -> None:
    now = [0.0]
    dog = LoopWatchdog(threshold_s=1.0, beat_s=0.1, clock=lambda: now[0])
    dog._loop_thread = threading.get_ident()
    assert dog.beat() is None
    now[0] = 0.5
    assert dog.check() is None  # late, not blocked
    now[0] = 2.0
    assert dog.check() is not None
    now[0] = 3.0
    assert dog.check() is None  # the same stall: found once
    now[0] = 3.5
    stall = dog.beat()
    assert stall is not None
    assert stall.seconds == pytest.approx(3.5)
    assert dog.beat() is None
