"""Answers where you wait: `send --wait` and `GET /v1/agents/NAME/tasks/TASK` say where a
task got to and, when it waits for a person, what to run to answer it."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from agentos.client import Client, NotFound
from agentos.core.taskview import answer_command, task_view
from agentos.core.waits import WaitKind, WaitRecord
from agentos.ingress import build_app
from agentos.store import Store
from tests.cli_support import base_env, cli, exited, show, spawn
from tests.helpers import agent_doc, apply, running_daemon, wait_until

pytestmark = [pytest.mark.anyio]

APPROVER = "tests.wait_agents:Approver"


def wait_record(**kw: object) -> WaitRecord:
    base: dict[str, object] = {
        "agent": "a",
        "task_id": "m-1-0",
        "park_id": "p",
        "kind": WaitKind.ASK,
        "question": "Deploy?",
        "choices": ("yes", "no"),
        "deadline": 100.0,
        "default": None,
        "has_default": False,
        "since": 1.0,
        "seq": 0,
    }
    return WaitRecord(**{**base, **kw})  # type: ignore[arg-type]


def test_the_view_of_a_waiting_task_says_what_to_run() -> None:
    wait = wait_record(tool="ws.write_file", arguments='{"path": "a"}')
    view = task_view("a", "m-1-0", {"status": "waiting", "attempt": "2"}, wait=wait)
    assert view["status"] == "waiting"
    assert view["attempt"] == 2
    assert not view["done"]
    assert view["waitingFor"] == {
        "kind": "approval",
        "question": "Deploy?",
        "choices": ["yes", "no"],
        "deadline": "1970-01-01T00:01:40.000Z",
        "answered": False,
        "answer": "agentos answer a m-1-0 --yes | --no [--reason TEXT]",
        "tool": "ws.write_file",
        "arguments": {"path": "a"},
    }
    assert answer_command(wait_record(choices=("red", "blue"))) == (
        "agentos answer a m-1-0 --choice red|blue"
    )
    assert answer_command(wait_record(choices=None)).endswith("--text 'YOUR ANSWER'")
    retrying = task_view("a", "t", {"status": "retrying", "error": "EngineUnavailable: down"})
    assert retrying["reason"] == "EngineUnavailable: down"
    queued = task_view("a", "t", {}, status={"phase": "Hibernated", "reason": "Idle"})
    assert queued["status"] == "notStarted"
    assert queued["reason"].startswith("the agent is Hibernated (Idle")
    done = task_view("a", "t", {"status": "succeeded", "result": "ok", "finished_at": "5.0"})
    assert (done["done"], done["result"], done["finishedAt"]) == (
        True,
        "ok",
        "1970-01-01T00:00:05.000Z",
    )


async def test_send_wait_prints_the_question_and_the_answer_command_then_the_result(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("appr", APPROVER, triggers=[{"inbox": {}}]))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    client = Client(store)
    async with running_daemon(store):
        quick = await cli(env, "send", "appr", "ship it", "--wait", "--no-wait-answer")
        assert quick.returncode == 0, show(quick)
        assert "is waiting: it waits for ask" in quick.stderr
        (pending,) = await client.pending("appr")
        assert f"agentos answer appr {pending.task_id} --yes | --no" in quick.stderr
        await client.answer("appr", pending.task_id, yes=True, by="ops")

        log = tmp_path / "send.log"
        with spawn(env, log, "send", "appr", "deploy", "--wait", "--timeout", "40s") as proc:

            async def told() -> bool:
                return "--yes | --no" in log.read_text()

            await wait_until(told, within=30, what="send --wait to print the answer command")
            (second,) = [w for w in await client.pending("appr") if w.task_id != pending.task_id]
            await client.answer("appr", second.task_id, no=True, by="ops")
            code = await exited(proc, within=30)
    printed = log.read_text()
    assert code == 0, printed
    assert f"task {second.task_id} of appr is waiting: it waits for ask" in printed
    assert printed.rstrip().endswith("deploy: no")


async def test_a_wait_that_times_out_says_what_the_task_waits_for(store: Store) -> None:
    await apply(store, agent_doc("appr", APPROVER, triggers=[{"inbox": {}}]))
    client = Client(store)
    async with running_daemon(store):
        msg = await client.send("appr", "deploy")
        with pytest.raises(Exception, match=r"after 5s, task m-.* is waiting: it waits for ask"):
            await client.wait_task("appr", f"m-{msg}", timeout_s=5)
    with pytest.raises(NotFound):
        await client.task_view("appr", "m-1-0")
    with pytest.raises(NotFound):
        await client.task_view("appr", "not-a-task")


async def test_the_task_endpoint_long_polls_and_the_send_points_to_it(store: Store) -> None:
    await apply(store, agent_doc("appr", APPROVER, triggers=[{"inbox": {}}]))
    app = build_app(Client(store), token=None, ready=lambda: True, stopping=lambda: False)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http,
        running_daemon(store),
    ):
        sent = await http.post("/v1/agents/appr/messages", content="deploy")
        assert sent.status_code == 202
        location = sent.headers["location"]
        assert location == f"/v1/agents/appr/tasks/{sent.json()['taskId']}"
        view: dict[str, object] = {"status": ""}
        with anyio.fail_after(30):
            while view["status"] != "waiting":
                got = await http.get(location, params={"wait": "10s"})
                assert got.status_code == 200, got.text
                view = got.json()
        waiting = view["waitingFor"]
        assert isinstance(waiting, dict)
        assert waiting["choices"] == ["yes", "no"]
        answer = await http.post(
            location + "/answer", json={"yes": True}, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        with anyio.fail_after(30):
            while not view["done"]:
                view = (await http.get(location, params={"wait": "10s"})).json()
        assert view["status"] == "succeeded"
        assert view["result"] == "deploy: yes"
        bad = await http.get(location, params={"wait": "forever"})
        assert bad.status_code == 400
        assert "wait must be a duration" in bad.text
        unknown = await http.get("/v1/agents/appr/tasks/m-1-0")
        assert unknown.status_code == 404
    assert json.loads(json.dumps(view))  # plain JSON
