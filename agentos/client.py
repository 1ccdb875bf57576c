"""The programmatic interface to a fleet: apply specs, send messages, read status and events.

The CLI is built on this class and nothing else, so whatever an operator can do at the
terminal a program can do too. A :class:`Client` talks to Redis only; it works whether
or not a daemon is running (commands then wait in Redis for one).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from agentos.client_usage import UsageClientMixin
from agentos.client_views import (
    AgentDetail,
    AgentSummary,
    mark_unschedulable,
    unschedulable_agents,
    unschedulable_rows,
)
from agentos.client_waits import AnswerRejected, TaskOver, WaitClientMixin
from agentos.core.code import with_code
from agentos.core.errors import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ClientError,
    MessageTooLarge,
    NotFound,
)
from agentos.core.fleet import (
    DEFAULT_CLASS,
    diff_paths,
    fleet_issues,
    inbox_depth,
    toolserver_issues,
)
from agentos.core.metering import price_issues
from agentos.core.models import model_issues
from agentos.core.spec import (
    AgentResource,
    Document,
    SpecError,
    inbox_limit,
)
from agentos.core.taskview import DONE, describe_view, task_view
from agentos.governor.evaluator import stored_policies
from agentos.settings import Settings
from agentos.store import (
    AppliedChange,
    DeadLetter,
    Event,
    SendRefused,
    SpecRecord,
    Store,
    StoreUnavailable,
)
from agentos.store import EventsFull as _StoreEventsFull
from agentos.store import InboxFull as _StoreInboxFull
from agentos.store import SendConflict as _StoreSendConflict
from agentos.store.embedded import embedded_url
from agentos.store.retry import new_op_id, retry

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AgentDetail",
    "AgentSummary",
    "AnswerRejected",
    "Client",
    "ClientError",
    "EventsFull",
    "InboxFull",
    "MessageTooLarge",
    "NoRedisConfigured",
    "NotFound",
    "SendConflict",
    "TaskOver",
    "resolve_redis_url",
    "spec_hash",
]


class InboxFull(ClientError, _StoreInboxFull):
    """The agent's inbox holds ``maxDepth`` messages already (``depth``, ``limit``);
    nothing was enqueued: try again after ``retry_after_s`` (HTTP: 429, Retry-After)."""


class SendConflict(ClientError, _StoreSendConflict):
    """The send id (an HTTP ``Idempotency-Key``) already sent another body, as message
    ``message_id``; nothing was enqueued (HTTP: 409)."""


class EventsFull(ClientError, _StoreEventsFull):
    """The agent does not wait for the event and keeps as many events sent while it was
    not waiting as it may (by count or bytes); the event was not kept (HTTP: 429)."""


class InUse(ClientError):
    """The resource is still needed by others (a policy whose classes agents use)."""


class NoRedisConfigured(ClientError):
    """No Redis URL was given and no embedded server is running for this home."""


def resolve_redis_url(settings: Settings) -> str:
    """The Redis URL to use: the configured one, else the running embedded server's.

    Raises :class:`NoRedisConfigured` when there is neither.
    """
    if settings.redis_url:
        return settings.redis_url
    url = embedded_url(settings.home)
    if url is None:
        raise NoRedisConfigured(
            "no Redis to talk to: start the fleet with `agentos up` (embedded Redis under "
            f"{settings.home}) or set AGENTOS_REDIS_URL / --redis"
        )
    return url


def spec_hash(document: dict[str, Any]) -> str:
    """A short, stable hash of a canonical resource (what `apply` compares)."""
    body = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class Client(WaitClientMixin, UsageClientMixin):
    """Operate one agentos namespace. Use ``async with await Client.connect(settings)``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    async def connect(cls, settings: Settings) -> Client:
        """Connect to the fleet's Redis. Raises :class:`ClientError` when it is not there."""
        url = resolve_redis_url(settings)
        try:
            store = await Store.connect(url, namespace=settings.namespace)
        except StoreUnavailable as e:
            raise ClientError(str(e)) from None
        return cls(store)

    async def close(self) -> None:
        """Close the connection."""
        await self.store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ desired state

    async def apply(
        self, documents: Sequence[Document], *, dry_run: bool = False
    ) -> list[AppliedChange]:
        """Store validated documents, all or nothing; returns what changed per resource.

        Raises :class:`SpecError` (with file:line) when the documents do not fit the
        fleet: an agent naming a quota class no policy defines, two policies defining
        one class, or a policy dropping a class that agents still use.
        """
        await self._check_fleet(documents)
        stored_agents = await self.store.agent_specs_of(
            [d.name for d in documents if d.kind == "Agent"]
        )
        stored_policies = (
            await self.store.policies() if any(d.kind == "QuotaPolicy" for d in documents) else {}
        )
        before = {("Agent", n): b for n, b in stored_agents.items()}
        before |= {("QuotaPolicy", n): b for n, b in stored_policies.items()}
        bodies = with_code(documents)
        records = []
        for doc, body in zip(documents, bodies, strict=True):
            agent = doc.resource if isinstance(doc.resource, AgentResource) else None
            records.append(
                SpecRecord(
                    doc.kind,
                    doc.name,
                    json.dumps(body, sort_keys=True),
                    spec_hash(body),
                    agent.spec.priority if agent is not None else 0,
                    inbox_limit(agent) if agent is not None else None,
                    inbox_depth(agent) if agent is not None else None,
                )
            )
        changes = await self.store.apply(records, dry_run=dry_run)
        by_key = {(d.kind, d.name): b for d, b in zip(documents, bodies, strict=True)}
        return [
            replace(c, fields=tuple(diff_paths(before[(c.kind, c.name)], by_key[(c.kind, c.name)])))
            if c.action == "configured" and (c.kind, c.name) in before
            else c
            for c in changes
        ]

    async def _check_fleet(self, documents: Sequence[Document]) -> None:
        agents = {
            name: str(body.get("spec", {}).get("quotaClass", DEFAULT_CLASS))
            for name, body in (await self.store.agent_specs()).items()
        }
        policies = stored_policies(await self.store.policies())
        issues = fleet_issues(documents, agents, policies)
        issues += model_issues(documents, await self.store.models())
        issues += price_issues(documents, policies)
        issues += toolserver_issues(documents, await self.store.toolservers())
        if issues:
            raise SpecError(issues)

    async def delete_agent(self, name: str) -> None:
        """Delete an agent: its spec now, its state and history once its daemon stops it.

        Raises :class:`NotFound` when no such agent is applied.
        """
        if not await self.store.delete("Agent", name):
            raise NotFound(f'agent "{name}" not found')

    async def delete_policy(self, name: str) -> None:
        """Delete a QuotaPolicy. Raises :class:`NotFound` when there is none by that name,
        :class:`InUse` when agents use one of its classes."""
        policies = stored_policies(await self.store.policies())
        policy = policies.get(name)
        if policy is not None:
            users = sorted(
                agent
                for agent, body in (await self.store.agent_specs()).items()
                if body.get("spec", {}).get("quotaClass", DEFAULT_CLASS) in policy.spec.classes
                and body.get("spec", {}).get("quotaClass", DEFAULT_CLASS) != DEFAULT_CLASS
            )
            if users:
                raise InUse(
                    f'policy "{name}" defines quota classes used by agents '
                    f"{', '.join(users)}; move them to another class or delete them first"
                )
        if not await self.store.delete("QuotaPolicy", name):
            raise NotFound(f'policy "{name}" not found')

    async def agent_specs(self) -> dict[str, dict[str, Any]]:
        """Every applied Agent resource by name (canonical form)."""
        return await self.store.agent_specs()

    async def policies(self) -> dict[str, dict[str, Any]]:
        """Every applied QuotaPolicy resource by name (canonical form)."""
        return await self.store.policies()

    # ------------------------------------------------------------------ status

    async def agents(self, names: Sequence[str] | None = None) -> list[AgentSummary]:
        """Every applied agent with its status, sorted by name; with ``names``, only
        those (in that order; names not applied are left out), reading only theirs."""
        if names is None:
            specs = await self.store.agent_specs()
            names = sorted(specs)
        else:
            specs = await self.store.agent_specs_of(names)
            names = [n for n in names if n in specs]  # deleted since the names were read
        statuses = await self.store.statuses(list(names))
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
        return unschedulable_rows(out, await unschedulable_agents(self.store, specs))

    async def describe(self, name: str, *, events: int = 20) -> AgentDetail:
        """Spec, status, inbox depth and recent events of one agent.

        Raises :class:`NotFound` when no such agent is applied.
        """
        spec = await self.store.agent_spec(name)
        if spec is None:
            raise NotFound(f'agent "{name}" not found')
        unplaced = (await unschedulable_agents(self.store, {name: spec})).get(name)
        return AgentDetail(
            name=name,
            spec=spec,
            status=mark_unschedulable(await self.store.status(name), unplaced),
            events=await self.store.events(name, count=events),
            inbox_depth=await self.store.inbox_depth(name),
            tasks=await self.store.tasks(name, count=5),
        )

    async def events(self, name: str | None = None, *, count: int = 50) -> list[Event]:
        """Recent events of one agent, or of the fleet, oldest first."""
        if name is not None:
            await self._require(name)
        return await self.store.events(name, count=count)

    async def follow_events(
        self, name: str | None = None, *, count: int = 20
    ) -> AsyncIterator[Event]:
        """The last ``count`` events, then every new one as it happens (until cancelled)."""
        if name is not None:
            await self._require(name)
        last = "0-0"
        for e in await self.store.events(name, count=count):
            last = e.id
            yield e
        while True:
            for e in await self.store.events(name, after_id=last, block_ms=1000, count=100):
                last = e.id
                yield e

    # ------------------------------------------------------------------ commands

    async def send(
        self,
        name: str,
        body: str,
        *,
        key: str | None = None,
        traceparent: str | None = None,
        send_id: str | None = None,
    ) -> str:
        """Put a message in an agent's inbox. Returns the message id.

        With ``send_id`` (an HTTP ``Idempotency-Key``'s, say) the send is made at most
        once for an hour: the same id again returns the first message's id, and raises
        :class:`SendConflict` if it comes with another body. Raises :class:`NotFound`
        for an unknown agent, :class:`MessageTooLarge` for a message larger than its
        inbox takes, :class:`InboxFull` when its inbox holds ``maxDepth`` messages;
        nothing is enqueued then.
        """
        # One round trip: the script checks the agent, the size and the depth. A pooled
        # connection to a Redis that restarted fails once: a few quick retries reach a
        # fresh one, safe because the send carries an id.
        send_id = send_id or new_op_id()
        digest = body_digest(body)
        try:
            return await retry(
                lambda: self.store.send(
                    name,
                    body,
                    key=key,
                    traceparent=traceparent,
                    send_id=send_id,
                    check_limit=DEFAULT_MAX_MESSAGE_BYTES,
                    digest=digest,
                ),
                what=f"send to {name}",
                max_delay_s=0.5,
                attempts=3,
            )
        except SendRefused as e:
            if e.limit is None:
                raise NotFound(f'agent "{name}" not found') from None
            raise MessageTooLarge(name, len(body.encode()), e.limit) from None
        except _StoreInboxFull as e:
            raise InboxFull(name, e.depth, e.limit, e.retry_after_s) from None
        except _StoreSendConflict as e:
            raise SendConflict(name, e.message_id) from None

    async def send_event(
        self, name: str, event: str, data: Any = None, *, by: str, now: float | None = None
    ) -> bool:
        """Send the event ``event`` (JSON ``data``) to agent ``name``: True when it ended
        a wait, False when kept for the agent's next ``wait_for`` of it. Raises
        :class:`EventsFull` when the agent keeps as many unawaited events as it may."""
        try:
            return await super().send_event(name, event, data, by=by, now=now)
        except _StoreEventsFull as e:
            raise EventsFull(e.name, e.event, e.what, e.limit) from None

    # ------------------------------------------------------------------ poison messages

    async def drop(self, name: str, task_id: str, *, by: str) -> str:
        """Drop the message of task ``task_id`` for good: out of the inbox (queued or
        being retried) or out of the dead letters, the task recorded as ``dropped`` with
        a ``Dropped`` event naming ``by``. Returns where it was: "inbox" or "dead".

        Raises :class:`NotFound` for an unknown agent, or a task with no message left
        (not a message's task, already done, dropped or re-driven).
        """
        await self._require(name)
        where = await self.store.drop_message(name, task_id, by=by)
        if where is None:
            raise NotFound(
                f'task {task_id} of agent "{name}" has no message to drop (neither waiting '
                "in its inbox nor a dead letter)"
            )
        return where

    async def retry_dead(self, name: str, task_id: str, *, by: str) -> str:
        """Send the dead letter of task ``task_id`` again (back into the inbox, out of the
        dead letters). Returns the new message id (its task is ``m-<id>``).

        Raises :class:`NotFound` for an unknown agent or a task with no dead letter,
        :class:`InboxFull` when the agent's inbox is full.
        """
        await self._require(name)
        try:
            message_id = await self.store.redrive(name, task_id, by=by)
        except SendRefused:
            raise NotFound(f'agent "{name}" not found') from None
        except _StoreInboxFull as e:
            raise InboxFull(name, e.depth, e.limit, e.retry_after_s) from None
        if message_id is None:
            raise NotFound(f'task {task_id} of agent "{name}" is not a dead letter')
        return message_id

    async def dead_letters(self, name: str, *, count: int = 100) -> list[DeadLetter]:
        """The agent's dead letters, newest first: messages whose task failed or was
        interrupted ``crashLoopAfter`` times in a row. Raises :class:`NotFound`."""
        await self._require(name)
        return await self.store.dead_letters(name, count=count)

    async def hibernate(self, name: str) -> bool:
        """Ask the agent's daemon to hibernate (and release) it as soon as it is idle;
        False (nothing asked) when it is hibernated already or no daemon holds it."""
        await self._require(name)
        if (await self.store.status(name)).get("phase") == "Hibernated":
            return False
        if name not in await self.store.leases([name]):
            return False
        await self.store.signal("hibernate", name)
        return True

    async def wake(self, name: str) -> None:
        """Run a wake task (and retry the agent if it Failed); an agent no daemon holds is
        activated for it by whichever daemon has room."""
        await self._require(name)
        if await self.store.wake(name, now=time.time()):
            await self.store.signal("wake", name)

    async def restart(self, name: str, *, grace_s: float | None = None) -> str | None:
        """Ask the agent's daemon to restart it (``agentos restart``): once its task ends
        (or after ``grace_s``) it is stopped gracefully and started again with its code
        loaded anew, and a ``Restarted`` event is written. Returns a mark for
        :meth:`restarted`, or None when no daemon holds the agent: there is nothing to
        restart (its next activation loads the applied code)."""
        await self._require(name)
        if name not in await self.store.leases([name]):
            return None
        last = await self.store.events(name, count=1)
        grace = "" if grace_s is None else repr(grace_s)
        await self.store.signal("restart", name, grace=grace)
        return last[-1].id if last else "0-0"

    async def restarted(self, name: str, mark: str) -> bool:
        """Whether the agent's daemon restarted it since ``mark`` (a ``Restarted``
        event: by the restart, or by a respec or a release that came first)."""
        events = await self.store.events(name, count=1000, after_id=mark)
        return any(e.type == "Restarted" for e in events)

    async def tasks(self, name: str | None = None, *, count: int = 20) -> list[dict[str, str]]:
        """Recent task records of one agent, or of every agent, newest first."""
        if name is not None:
            await self._require(name)
            return await self.store.tasks(name, count=count)
        rows: list[dict[str, str]] = []
        for agent in sorted(await self.store.agent_specs()):
            rows += await self.store.tasks(agent, count=count)
        rows.sort(key=lambda t: float(t.get("created_at") or 0), reverse=True)
        return rows[:count]

    async def task_view(self, name: str, task_id: str) -> dict[str, Any]:
        """Where task ``task_id`` of agent ``name`` got to, for its sender (see
        :func:`agentos.core.taskview.task_view`). Raises :class:`NotFound` for an
        unknown agent, or a task that has no record and no message in the inbox."""
        await self._require(name)
        record = await self.store.task(name, task_id)
        wait = await self.store.wait_get(name) if record.get("status") == "waiting" else None
        status = None
        if not record.get("status") or record.get("status") == "queued":
            status = await self.store.status(name)
            if not record and not await self._queued(name, task_id):
                raise NotFound(f'agent "{name}" has no task {task_id}')
        return task_view(name, task_id, record, wait=wait, status=status)

    async def _queued(self, name: str, task_id: str) -> bool:
        """Whether a task without a record is a message still in the inbox."""
        if not task_id.startswith("m-"):
            return False
        return await self.store.inbox_has(name, task_id[2:])

    async def wait_task(
        self,
        name: str,
        task_id: str,
        *,
        timeout_s: float = 60.0,
        poll_s: float = 0.1,
        on_change: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        until_waiting: bool = False,
    ) -> dict[str, str]:
        """Wait until a task ends (succeeded, failed, skipped, cancelled, dropped, dead)
        and return its record; with ``until_waiting``, also return once it waits for an
        answer. ``on_change(view)`` is awaited each time its status changes (a
        :meth:`task_view`: the question it waits for, why it retries).

        Raises :class:`ClientError` after ``timeout_s``, saying where the task got to
        and why.
        """
        seen = ""
        with anyio.move_on_after(timeout_s):
            while True:
                record = await self.store.task(name, task_id)
                state = record.get("status", "")
                if state in DONE:
                    return record
                if state != seen and state and (on_change is not None or until_waiting):
                    seen = state
                    if on_change is not None:
                        await on_change(await self.task_view(name, task_id))
                    if until_waiting and state == "waiting":
                        return record
                await anyio.sleep(poll_s)
        try:
            view = await self.task_view(name, task_id)
        except NotFound:
            view = {"agent": name, "taskId": task_id, "status": "not started"}
        raise ClientError(f"after {timeout_s:g}s, {describe_view(view)}")

    async def daemons(self) -> dict[str, dict[str, Any]]:
        """Heartbeats of the daemons serving this namespace."""
        return await self.store.daemons()

    async def _require(self, name: str) -> dict[str, Any]:
        spec = await self.store.agent_spec(name)
        if spec is None:
            raise NotFound(f'agent "{name}" not found')
        return spec


def body_digest(body: str) -> str:
    """A message body's digest, kept with its send id: the same id with another body is
    a conflict (:class:`SendConflict`), not a replay."""
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def read_message_arg(value: str) -> str:
    """`agentos send` message text: ``@FILE`` reads a file, ``-`` standard input."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        return Path(value[1:]).read_text()
    return value
