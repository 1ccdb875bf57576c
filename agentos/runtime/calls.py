"""The agent's calls out of its code, as its runner sees them: model calls and sends.

Every ``ctx.llm`` call is admitted (the class's money for the day, then the governor)
and metered (tokens, cost, the task's token limit); a routed engine asks the runner
for the same through the callbacks :func:`wire_route` sets. ``ctx.send`` is checked
like ``agentos send``. These are functions of the runner's collaborators (its writer,
usage meter, spend) so that the runner itself keeps only its state and its loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from agentos.core.errors import DEFAULT_MAX_MESSAGE_BYTES, MessageTooLarge, NotFound
from agentos.core.fairness import QuotaExceeded
from agentos.core.limits import TaskLimitExceeded, over_tokens
from agentos.core.modelusage import call_cost, model_usage
from agentos.engine.base import Completion, Engine, Reply
from agentos.governor.admission import Ticket
from agentos.runtime.routes import RouteEngine
from agentos.store import SendRefused, Write
from agentos.store.retry import new_op_id

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["admit", "class_left", "on_usage", "send", "wire_route"]


def wire_route(runner: AgentRunner, engine: Engine) -> str | None:
    """Give a routed engine its ways into the runner; the route's home model (None:
    not a route)."""
    if not isinstance(engine, RouteEngine):
        return None
    spec = runner.resource.spec

    async def route_event(type_: str, reason: str, message: str) -> None:
        """An event of the agent's route (Routed, Escalated, RouteExhausted)."""
        await runner.writer.write(Write(event=runner.writer.event(type_, reason, message)))

    async def left() -> float | None:
        return await class_left(runner)

    engine.events = route_event
    engine.spent = lambda: runner.state.task_cost
    engine.task_id = lambda: runner.ctx.task.id if runner.ctx is not None else ""
    engine.charge = lambda completion: on_usage(runner, completion)
    engine.class_left = left
    engine.day_resets_in = lambda: (
        runner.spend.resets_in(spec.quota_class) if runner.spend is not None else 3600.0
    )
    return engine.home


@asynccontextmanager
async def admit(
    runner: AgentRunner, estimate: Callable[[], int], timeout_s: float | None
) -> AsyncIterator[Ticket]:
    """Admit one model call: the class's money for the day first (a routed call is
    checked by its route, which prices each candidate), then the governor."""
    assert runner.governor is not None
    quota_class = runner.resource.spec.quota_class
    if not isinstance(runner.engine, RouteEngine):
        left = await class_left(runner)
        if left is not None:
            prices = runner.price_of(runner.home_model)
            projected = estimate() * max(prices.input, prices.output) / 1000
            if projected > left:
                assert runner.spend is not None
                raise QuotaExceeded(
                    kind="budget",
                    scope="class",
                    quota_class=quota_class,
                    limit="dailyCost",
                    retry_after_s=runner.spend.resets_in(quota_class),
                    agent=runner.name,
                )
    async with runner.governor.call(
        agent=runner.name,
        quota_class=quota_class,
        priority=runner.priority,
        estimate=estimate,
        timeout_s=timeout_s,
        model=runner.home_model,
    ) as ticket:
        yield ticket


async def class_left(runner: AgentRunner) -> float | None:
    """What the agent's quota class may still spend today (None: no dailyCost)."""
    if runner.spend is None:
        return None
    return await runner.spend.left(runner.resource.spec.quota_class)


def on_usage(runner: AgentRunner, completion: Completion | Reply) -> None:
    """Meter one model call; raises :class:`TaskLimitExceeded` (after metering) when the
    running task passed its token limit."""
    s = runner.state
    s.uses_model = True
    runner.tokens_in += completion.input_tokens
    runner.tokens_out += completion.output_tokens
    if s.busy:  # in a task: its token limit (raised under agent code, after metering)
        used = runner.tokens_in + runner.tokens_out - sum(s.task_tokens)
        s.over_tokens = over_tokens(runner.resource.spec.limits, used)
    runner.usage.add(tokens_in=completion.input_tokens, tokens_out=completion.output_tokens)
    model = completion.served_by or runner.home_model
    runner.usage.add(
        **model_usage(
            model,
            tokens_in=completion.input_tokens,
            cached=completion.cached_tokens,
            tokens_out=completion.output_tokens,
        )
    )
    cost = call_cost(
        runner.price_of(model),
        tokens_in=completion.input_tokens,
        cached=completion.cached_tokens,
        tokens_out=completion.output_tokens,
    )
    s.task_cost += cost
    if runner.spend is not None:
        runner.spend.add(runner.resource.spec.quota_class, cost)
    runner.dirty = True
    if s.over_tokens is not None:
        reason, s.over_tokens = s.over_tokens, None
        raise TaskLimitExceeded(reason)


async def send(runner: AgentRunner, agent: str, body: str) -> str:
    """``ctx.send``: checked like ``agentos send`` (the agent exists, the message fits
    its inbox, the inbox is not full), so a misspelled name leaves no orphan stream.
    Raises :class:`NotFound`, :class:`MessageTooLarge` or ``InboxFull`` to the agent."""
    # One send id for every retry: a send whose reply was lost is not sent twice.
    send_id = new_op_id()
    try:
        return await runner.writer.call(
            lambda: runner.store.inbox.send(
                agent, body, send_id=send_id, check_limit=DEFAULT_MAX_MESSAGE_BYTES
            ),
            "send",
        )
    except SendRefused as e:
        if e.limit is None:
            raise NotFound(f'agent "{agent}" not found') from None
        raise MessageTooLarge(agent, len(body.encode()), e.limit) from None
