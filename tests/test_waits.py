"""Durable waits end to end with an in-process daemon: ask, answer, timeout, events, sleep."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentos.client import AnswerRejected, Client
from agentos.store import Store
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = pytest.mark.anyio


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def waiting_task(store: Store, name: str) -> str:
    async def parked() -> str | None:
        st = await store.status(name)
        if st.get("phase") != "Waiting":
            return None
        wait = await store.wait_get(name)
        return wait.task_id if wait is not None else None

    return str(await wait_until(parked, within=15, what=f"{name} to wait"))


async def done(store: Store, name: str, task: str) -> dict[str, str]:
    async def finished() -> dict[str, str] | None:
        rec = await store.task(name, task)
        return rec if rec.get("status") in ("succeeded", "failed") else None

    return dict(await wait_until(finished, within=15, what=f"task {task} to finish"))


async def test_ask_parks_releases_and_resumes_with_the_answer(
    store: Store, tmp_path: Path
) -> None:
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
        assert await store.leases(["appr"]) == {}
        assert not d.engine.has_session("appr")
        (pending,) = await client.pending()
        assert (pending.agent, pending.task_id, pending.choices) == ("appr", task, ("yes", "no"))
        assert (await store.task("appr", task))["status"] == "waiting"
        with pytest.raises(AnswerRejected) as bad:
            await client.answer("appr", task, choice="maybe", by="op")
        assert bad.value.code == "invalid"
        with pytest.raises(AnswerRejected) as wrong:
            await client.answer("appr", "nope", yes=True, by="op")
        assert wrong.value.code == "not_waiting"
        assert (await store.wait_get("appr")).answer is None  # nothing changed
        await client.answer("appr", task, yes=True, by="alice")
        with pytest.raises(AnswerRejected) as second:
            await client.answer("appr", task, no=True, by="bob")
        assert second.value.code in ("answered", "not_waiting")
        record = await done(store, "appr", task)
    assert record["status"] == "succeeded"
    assert record["result"] == "deploy: yes"
    assert record["answered_by"] == "alice"
    assert lines(log) == ["before deploy", "before deploy", "after yes"]
    assert await store.wait_get("appr") is None
    assert await store.due_scan() == {}
    types = [e.type for e in await store.events("appr")]
    assert "Waiting" in types and "Answered" in types


async def _gone(d: object, name: str) -> bool:
    return name not in d.runners  # type: ignore[attr-defined]
