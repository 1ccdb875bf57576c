"""The :class:`Client` façade: one object a program holds to operate a fleet.

Every method is a short call into the module that does the job, with the store passed
as a keyword argument (kopf's style): the desired state (:mod:`~agentos.client.fleet`),
what operators read (:mod:`~agentos.client.reports`), what is asked of agents
(:mod:`~agentos.client.commands`), durable waits (:mod:`~agentos.client.waits`),
quotas and usage (:mod:`~agentos.client.usage`) and ``agentos eval``
(:mod:`~agentos.client.evals`). The façade keeps the connection and the defaults of
the public signatures, nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from agentos.client import commands, evals, fleet, reports, usage, waits
from agentos.client.errors import NoRedisConfigured
from agentos.client.evals import EvalReport
from agentos.client.views import AgentDetail, AgentSummary
from agentos.core.errors import ClientError, NotFound
from agentos.core.metering import PriceBook, Prices, UsageReport, UsageRow
from agentos.core.modelusage import ModelUsageRow
from agentos.core.policy import Evaluation
from agentos.core.spec import Document
from agentos.core.waits import Resolution, WaitRecord
from agentos.settings import Settings
from agentos.store import AppliedChange, DeadLetter, Event, Store, StoreUnavailable
from agentos.store.embedded import embedded_url

__all__ = ["Client", "resolve_redis_url"]


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


class Client:
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
        return await fleet.apply(documents, store=self.store, dry_run=dry_run)

    async def delete_agent(self, name: str) -> None:
        """Delete an agent: its spec now, its state and history once its daemon stops it.

        Raises :class:`NotFound` when no such agent is applied.
        """
        if not await self.store.specs.delete("Agent", name):
            raise NotFound(f'agent "{name}" not found')

    async def delete_policy(self, name: str) -> None:
        """Delete a QuotaPolicy. Raises :class:`NotFound` when there is none by that name,
        :class:`InUse` when agents use one of its classes."""
        await fleet.delete_policy(name, store=self.store)

    async def agent_specs(self) -> dict[str, dict[str, Any]]:
        """Every applied Agent resource by name (canonical form)."""
        return await self.store.specs.agents()

    async def policies(self) -> dict[str, dict[str, Any]]:
        """Every applied QuotaPolicy resource by name (canonical form)."""
        return await self.store.specs.policies()

    # ------------------------------------------------------------------ status

    async def agents(self, names: Sequence[str] | None = None) -> list[AgentSummary]:
        """Every applied agent with its status, sorted by name; with ``names``, only
        those (in that order; names not applied are left out), reading only theirs."""
        return await reports.agents(names, store=self.store)

    async def describe(self, name: str, *, events: int = 20) -> AgentDetail:
        """Spec, status, inbox depth and recent events of one agent.

        Raises :class:`NotFound` when no such agent is applied.
        """
        return await reports.describe(name, store=self.store, events=events)

    async def events(self, name: str | None = None, *, count: int = 50) -> list[Event]:
        """Recent events of one agent, or of the fleet, oldest first."""
        return await reports.events(name, store=self.store, count=count)

    def follow_events(self, name: str | None = None, *, count: int = 20) -> AsyncIterator[Event]:
        """The last ``count`` events, then every new one as it happens (until cancelled)."""
        return reports.follow_events(name, store=self.store, count=count)

    async def tasks(self, name: str | None = None, *, count: int = 20) -> list[dict[str, str]]:
        """Recent task records of one agent, or of every agent, newest first."""
        return await reports.tasks(name, store=self.store, count=count)

    async def task_view(self, name: str, task_id: str) -> dict[str, Any]:
        """Where task ``task_id`` of agent ``name`` got to, for its sender (see
        :func:`agentos.core.taskview.task_view`). Raises :class:`NotFound` for an
        unknown agent, or a task that has no record and no message in the inbox."""
        return await reports.task_view(name, task_id, store=self.store)

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
        return await reports.wait_task(
            name,
            task_id,
            store=self.store,
            timeout_s=timeout_s,
            poll_s=poll_s,
            on_change=on_change,
            until_waiting=until_waiting,
        )

    async def daemons(self) -> dict[str, dict[str, Any]]:
        """Heartbeats of the daemons serving this namespace."""
        return await self.store.heartbeats.daemons()

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
        return await commands.send(
            name, body, store=self.store, key=key, traceparent=traceparent, send_id=send_id
        )

    async def drop(self, name: str, task_id: str, *, by: str) -> str:
        """Drop the message of task ``task_id`` for good: out of the inbox (queued or
        being retried) or out of the dead letters, the task recorded as ``dropped`` with
        a ``Dropped`` event naming ``by``. Returns where it was: "inbox" or "dead".

        Raises :class:`NotFound` for an unknown agent, or a task with no message left
        (not a message's task, already done, dropped or re-driven).
        """
        return await commands.drop(name, task_id, store=self.store, by=by)

    async def retry_dead(self, name: str, task_id: str, *, by: str) -> str:
        """Send the dead letter of task ``task_id`` again (back into the inbox, out of the
        dead letters). Returns the new message id (its task is ``m-<id>``).

        Raises :class:`NotFound` for an unknown agent or a task with no dead letter,
        :class:`InboxFull` when the agent's inbox is full.
        """
        return await commands.retry_dead(name, task_id, store=self.store, by=by)

    async def dead_letters(self, name: str, *, count: int = 100) -> list[DeadLetter]:
        """The agent's dead letters, newest first: messages whose task failed or was
        interrupted ``crashLoopAfter`` times in a row. Raises :class:`NotFound`."""
        return await commands.dead_letters(name, store=self.store, count=count)

    async def hibernate(self, name: str) -> bool:
        """Ask the agent's daemon to hibernate (and release) it as soon as it is idle;
        False (nothing asked) when it is hibernated already or no daemon holds it."""
        return await commands.hibernate(name, store=self.store)

    async def wake(self, name: str) -> None:
        """Run a wake task (and retry the agent if it Failed); an agent no daemon holds is
        activated for it by whichever daemon has room."""
        await commands.wake(name, store=self.store)

    async def restart(self, name: str, *, grace_s: float | None = None) -> str | None:
        """Ask the agent's daemon to restart it (``agentos restart``): once its task ends
        (or after ``grace_s``) it is stopped gracefully and started again with its code
        loaded anew, and a ``Restarted`` event is written. Returns a mark for
        :meth:`restarted`, or None when no daemon holds the agent: there is nothing to
        restart (its next activation loads the applied code)."""
        return await commands.restart(name, store=self.store, grace_s=grace_s)

    async def restarted(self, name: str, mark: str) -> bool:
        """Whether the agent's daemon restarted it since ``mark`` (a ``Restarted``
        event: by the restart, or by a respec or a release that came first)."""
        return await commands.restarted(name, mark, store=self.store)

    # ------------------------------------------------------------------ durable waits

    async def pending(self, name: str | None = None) -> list[WaitRecord]:
        """Parked waits (of one agent, or of the fleet), oldest first."""
        return await waits.pending(name, store=self.store)

    async def answer(
        self,
        name: str,
        task_id: str,
        *,
        yes: bool = False,
        no: bool = False,
        choice: str | None = None,
        text: str | None = None,
        by: str,
        now: float | None = None,
        reason: str = "",
    ) -> Resolution:
        """Answer the question task ``task_id`` of agent ``name`` waits on; returns what was
        recorded. Raises :class:`AnswerRejected` (nothing changed) when the answer does
        not fit, the task does not wait, or it was answered already, and
        :class:`agentos.client.NotFound` for an unknown agent. ``reason`` (why; for a
        refused tool call it reaches the model) is kept with the answer.
        """
        return await waits.answer(
            name,
            task_id,
            store=self.store,
            yes=yes,
            no=no,
            choice=choice,
            text=text,
            by=by,
            now=now,
            reason=reason,
        )

    async def cancel_task(self, name: str, task_id: str, *, by: str, reason: str = "") -> str:
        """Cancel task ``task_id`` of agent ``name`` (``agentos tasks cancel``): it ends
        ``cancelled`` with a ``TaskCancelled`` event naming ``by``; it is not retried and
        is not a crash. Returns where it was: ``inbox`` (its message had not run: gone
        now), ``dead`` (a dead letter: gone now), ``waiting`` (parked on a wait: ended
        when a daemon next activates the agent, at once) or ``running`` (its daemon cuts
        it short; the record notes the cancel, so a daemon that takes the agent over
        ends the task instead of running it).

        Raises :class:`agentos.client.NotFound` for an unknown agent or task,
        :class:`TaskOver` for a task that ended already (nothing changed).
        """
        return await waits.cancel_task(name, task_id, store=self.store, by=by, reason=reason)

    async def send_event(
        self, name: str, event: str, data: Any = None, *, by: str, now: float | None = None
    ) -> bool:
        """Send the event ``event`` (JSON ``data``) to agent ``name``: True when it ended
        a wait, False when kept for the agent's next ``wait_for`` of it. Raises
        :class:`EventsFull` when the agent keeps as many unawaited events as it may."""
        return await waits.send_event(name, event, data, store=self.store, by=by, now=now)

    # ------------------------------------------------------------------ quotas and usage

    async def quota(self, *, now: float | None = None) -> dict[str, Any]:
        """Effective limits per class and per agent, usage now, and who is waiting."""
        return await usage.quota(store=self.store, now=now)

    async def explain(
        self,
        name: str | None = None,
        *,
        documents: Sequence[Document] = (),
        now: float | None = None,
    ) -> tuple[Evaluation, dict[str, float], float | None]:
        """Evaluate the policies now, without writing anything.

        Uses the fleet metrics and rule memory the evaluator last stored. ``documents``
        (QuotaPolicy ones) stand in for the stored policies of the same name: what
        ``apply --dry-run`` shows. With ``name``, only that policy's rules are listed.
        Returns the evaluation, the metrics used and when they were measured.
        """
        return await usage.explain(name, store=self.store, documents=documents, now=now)

    async def price_book(self) -> PriceBook:
        """The fleet's prices: each applied Model's, and the fleet's on the QuotaPolicy
        that declares ``spec.prices``."""
        return await usage.price_book(store=self.store)

    async def usage_report(
        self, *, by: str = "agent", since_days: int = 7, now: float | None = None
    ) -> UsageReport:
        """Metered usage of the last ``since_days`` UTC days (today included), summed by
        ``agent``, ``class``, ``route``, ``day`` or ``model``, priced from the fleet's
        prices (:meth:`price_book`), with a total and what could not be priced. ``model``
        prices tokens only (agent-hours and KV storage belong to agents).

        Raises ValueError for another ``by``.
        """
        return await usage.usage_report(store=self.store, by=by, since_days=since_days, now=now)

    async def usage(
        self,
        *,
        by: str = "agent",
        since_days: int = 7,
        prices: Prices | None = None,
        now: float | None = None,
    ) -> list[UsageRow]:
        """The rows of :meth:`usage_report` by ``agent``, ``class``, ``route`` or ``day``
        (no total); with ``prices``, priced with that flat table instead of the fleet's."""
        return await usage.usage(
            store=self.store, by=by, since_days=since_days, prices=prices, now=now
        )

    async def usage_by_model(
        self, *, since_days: int = 7, now: float | None = None
    ) -> list[ModelUsageRow]:
        """Tokens in, cached and out per model over the last ``since_days`` UTC days,
        priced with each applied Model's ``prices``, with the tasks each model served
        last (no total)."""
        return await usage.usage_by_model(store=self.store, since_days=since_days, now=now)

    async def evaluate_tasks(
        self,
        name: str,
        *,
        task_id: str | None = None,
        since_s: float | None = None,
        now: float | None = None,
    ) -> EvalReport:
        """Run agent ``name``'s evaluator again over its recorded tasks that ended
        normally (one task with ``task_id``; those created in the last ``since_s``
        seconds; else every recorded one, at most
        :data:`agentos.client.evals.EVAL_MAX_TASKS`), record each verdict and move its
        count in the usage of the day it was counted on. Judging again with the same
        verdicts changes no count.

        Raises :class:`NotFound` (no such agent or task), :class:`NoEvaluator` (the agent
        declares no ``spec.evaluate``, or it cannot be imported here) and
        :class:`ClientError` (``task_id`` did not end normally): nothing is changed then.
        """
        return await evals.evaluate_tasks(
            name, store=self.store, task_id=task_id, since_s=since_s, now=now
        )
