"""What the client reads back for operators: agents, events, tasks and where a task got to.

`agentos ps`, `describe`, `events`, `tasks` and `send --wait` (and their HTTP
endpoints) are built on these reads. Each is a module function that takes the store
as a keyword argument; :class:`agentos.client.Client` calls them. None writes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio

from agentos.client.views import (
    AgentDetail,
    AgentSummary,
    mark_unschedulable,
    unschedulable_agents,
    unschedulable_rows,
)
from agentos.core.errors import ClientError, NotFound
from agentos.core.taskview import DONE, describe_view
from agentos.core.taskview import task_view as view_of
from agentos.store import Event, Store

__all__ = [
    "agents",
    "describe",
    "events",
    "follow_events",
    "require_agent",
    "task_view",
    "tasks",
    "wait_task",
]


async def require_agent(name: str, *, store: Store) -> dict[str, Any]:
    """The applied Agent resource ``name``; raises :class:`NotFound` when there is none."""
    spec = await store.specs.agent(name)
    if spec is None:
        raise NotFound(f'agent "{name}" not found')
    return spec


async def agents(names: Sequence[str] | None, *, store: Store) -> list[AgentSummary]:
    """Every applied agent with its status, sorted by name; with ``names``, only
    those (in that order; names not applied are left out), reading only theirs."""
    if names is None:
        specs = await store.specs.agents()
        names = sorted(specs)
    else:
        specs = await store.specs.agents_of(names)
        names = [n for n in names if n in specs]  # deleted since the names were read
    statuses = await store.agents.statuses(list(names))
    out = []
    for name in names:
        st = statuses.get(name, {})
        spec = specs[name]
        last = st.get("last_activity")
        out.append(
            AgentSummary(
                name=name,
                phase=st.get("phase") or "Pending",
                owner=st.get("owner", ""),
                reason=st.get("reason", ""),
                restarts=int(st.get("restarts") or 0),
                tasks=int(st.get("tasks_succeeded") or 0) + int(st.get("tasks_failed") or 0),
                tasks_failed=int(st.get("tasks_failed") or 0),
                steps=int(st.get("steps") or 0),
                last_activity=float(last) if last else None,
                priority=int(spec.get("spec", {}).get("priority", 50)),
                labels=dict(spec.get("metadata", {}).get("labels", {})),
                kv_bytes=int(st.get("kv_bytes") or 0),
            )
        )
    # No live daemon may host these: they say so, whatever their status says.
    return unschedulable_rows(out, await unschedulable_agents(store, specs))


async def describe(name: str, *, store: Store, events: int) -> AgentDetail:
    """Spec, status, inbox depth and recent events of one agent.

    Raises :class:`NotFound` when no such agent is applied.
    """
    spec = await store.specs.agent(name)
    if spec is None:
        raise NotFound(f'agent "{name}" not found')
    unplaced = (await unschedulable_agents(store, {name: spec})).get(name)
    return AgentDetail(
        name=name,
        spec=spec,
        status=mark_unschedulable(await store.agents.status(name), unplaced),
        events=await store.events.read(name, count=events),
        inbox_depth=await store.inbox.depth(name),
        tasks=await store.tasks.recent(name, count=5),
    )


async def events(name: str | None, *, store: Store, count: int) -> list[Event]:
    """Recent events of one agent, or of the fleet, oldest first."""
    if name is not None:
        await require_agent(name, store=store)
    return await store.events.read(name, count=count)


async def follow_events(name: str | None, *, store: Store, count: int) -> AsyncIterator[Event]:
    """The last ``count`` events, then every new one as it happens (until cancelled)."""
    if name is not None:
        await require_agent(name, store=store)
    last = "0-0"
    for e in await store.events.read(name, count=count):
        last = e.id
        yield e
    while True:
        for e in await store.events.read(name, after_id=last, block_ms=1000, count=100):
            last = e.id
            yield e


async def tasks(name: str | None, *, store: Store, count: int) -> list[dict[str, str]]:
    """Recent task records of one agent, or of every agent, newest first."""
    if name is not None:
        await require_agent(name, store=store)
        return await store.tasks.recent(name, count=count)
    rows: list[dict[str, str]] = []
    for agent in sorted(await store.specs.agents()):
        rows += await store.tasks.recent(agent, count=count)
    rows.sort(key=lambda t: float(t.get("created_at") or 0), reverse=True)
    return rows[:count]


async def task_view(name: str, task_id: str, *, store: Store) -> dict[str, Any]:
    """Where task ``task_id`` of agent ``name`` got to, for its sender (see
    :func:`agentos.core.taskview.task_view`). Raises :class:`NotFound` for an
    unknown agent, or a task that has no record and no message in the inbox."""
    await require_agent(name, store=store)
    record = await store.tasks.get(name, task_id)
    wait = await store.waits.get(name) if record.get("status") == "waiting" else None
    status = None
    if not record.get("status") or record.get("status") == "queued":
        status = await store.agents.status(name)
        if not record and not await _queued(name, task_id, store=store):
            raise NotFound(f'agent "{name}" has no task {task_id}')
    return view_of(name, task_id, record, wait=wait, status=status)


async def _queued(name: str, task_id: str, *, store: Store) -> bool:
    """Whether a task without a record is a message still in the inbox."""
    if not task_id.startswith("m-"):
        return False
    return await store.inbox.has(name, task_id[2:])


async def wait_task(
    name: str,
    task_id: str,
    *,
    store: Store,
    timeout_s: float,
    poll_s: float,
    on_change: Callable[[dict[str, Any]], Awaitable[None]] | None,
    until_waiting: bool,
) -> dict[str, str]:
    """Wait until a task ends (succeeded, failed, skipped, cancelled, dropped, dead)
    and return its record; with ``until_waiting``, also return once it waits for an
    answer. ``on_change(view)`` is awaited each time its status changes (a
    :func:`task_view`: the question it waits for, why it retries).

    Raises :class:`ClientError` after ``timeout_s``, saying where the task got to
    and why.
    """
    seen = ""
    with anyio.move_on_after(timeout_s):
        while True:
            record = await store.tasks.get(name, task_id)
            state = record.get("status", "")
            if state in DONE:
                return record
            if state != seen and state and (on_change is not None or until_waiting):
                seen = state
                if on_change is not None:
                    await on_change(await task_view(name, task_id, store=store))
                if until_waiting and state == "waiting":
                    return record
            await anyio.sleep(poll_s)
    try:
        view = await task_view(name, task_id, store=store)
    except NotFound:
        view = {"agent": name, "taskId": task_id, "status": "not started"}
    raise ClientError(f"after {timeout_s:g}s, {describe_view(view)}")
