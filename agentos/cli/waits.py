"""The commands for durable waits: who waits for what, answers, and events.

``pending`` lists the parked waits (agent, task, question, choices, since, deadline);
``answer`` records an operator's answer (who: the OS user, or ``--as``), ``event``
sends a named event. An answer that does not fit the question, comes for a task that
does not wait, or comes second exits 2 with nothing changed.
"""

from __future__ import annotations

import getpass
import json
import time
from typing import Annotated

import typer
from rich.table import Table

from agentos.cli.common import (
    Output,
    OutputOpt,
    _client,
    _emit,
    _fail,
    _run,
    cell,
    complete_agents,
    out,
    printable,
)
from agentos.client import AnswerRejected
from agentos.core.waits import WaitRecord
from agentos.ingress import has_control, parse_json

__all__ = ["answer", "event", "pending"]


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _pending_table(waits: list[WaitRecord]) -> Table | str:
    if not waits:
        return "no task is waiting"
    table = Table(box=None, pad_edge=False)
    for col in ("AGENT", "TASK", "KIND", "QUESTION", "CHOICES", "SINCE", "DEADLINE"):
        table.add_column(col)
    for w in waits:
        deadline = "-"
        if w.deadline is not None:
            deadline = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.deadline))
        table.add_row(
            *map(
                cell,
                (
                    w.agent,
                    w.task_id,
                    "approval" if w.tool else w.kind.value,
                    f"{w.tool}({w.arguments})" if w.tool else w.question,
                    "/".join(w.choices)
                    if w.choices
                    else ("-" if w.kind.value != "ask" else "(text)"),
                    _ago(w.since) + (" (answered)" if w.answer is not None else ""),
                    deadline,
                ),
            )
        )
    return table


def _who(as_: str | None) -> str:
    """Who answers: ``--as`` or the OS user; it goes into events, so it is one plain line."""
    by = as_ or getpass.getuser()
    if has_control(by):
        _fail("--as must not hold control characters", 2)
    return by


def _choices_text(w: WaitRecord) -> str:
    if w.choices:
        return "/".join(w.choices)
    return "(text)" if w.kind.value == "ask" else "-"


def pending(
    name: Annotated[
        str | None,
        typer.Argument(help="Only this agent's waits.", autocompletion=complete_agents),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List the tasks that wait for an answer, an event or a time."""

    async def go() -> None:
        async with await _client() as client:
            waits = await client.pending(name)
        _emit([w.to_dict() for w in waits], output, lambda: _pending_table(waits))

    _run(go)


def answer(
    name: Annotated[str, typer.Argument(help="The agent.", autocompletion=complete_agents)],
    task: Annotated[str, typer.Argument(help="The waiting task's id (see `agentos pending`).")],
    yes: Annotated[bool, typer.Option("--yes", help="Approve (a yes/no question).")] = False,
    no: Annotated[bool, typer.Option("--no", help="Refuse (a yes/no question).")] = False,
    choice: Annotated[str | None, typer.Option(help="One of the choices offered.")] = None,
    text: Annotated[str | None, typer.Option(help="A free-text answer.")] = None,
    as_: Annotated[
        str | None, typer.Option("--as", help="Who answers (default: the OS user).")
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option(help="Why (kept with the answer; a refused tool call tells the model)."),
    ] = None,
) -> None:
    """Answer a waiting task's question (or a tool call's approval); the agent resumes."""
    by = _who(as_)
    if reason is not None and has_control(reason):
        _fail("--reason must not hold control characters", 2)

    async def go() -> None:
        async with await _client() as client:
            try:
                r = await client.answer(
                    name, task, yes=yes, no=no, choice=choice, text=text, by=by, reason=reason or ""
                )
            except AnswerRejected as e:
                _fail(str(e), 2)
        why = f": {r.reason}" if r.reason else ""
        out.print(
            printable(f"answered {name}/{task}: {json.dumps(r.value)} (by {by}{why})"),
            markup=False,
        )

    _run(go)


def event(
    name: Annotated[str, typer.Argument(help="The agent.", autocompletion=complete_agents)],
    event_name: Annotated[str, typer.Argument(metavar="EVENT", help="The event's name.")],
    data: Annotated[str, typer.Argument(help="The event's data, as JSON.")] = "null",
    as_: Annotated[
        str | None, typer.Option("--as", help="Who sends it (default: the OS user).")
    ] = None,
) -> None:
    """Send a named event to an agent (it ends a `ctx.wait_for` of that name)."""
    try:
        value = parse_json(data)
    except ValueError as e:
        _fail(f"DATA is not JSON: {e}", 2)
    if has_control(event_name):
        _fail("EVENT must not hold control characters", 2)
    by = _who(as_)

    async def go() -> None:
        async with await _client() as client:
            try:
                ended = await client.send_event(name, event_name, value, by=by)
            except AnswerRejected as e:
                _fail(str(e), 2)
        what = "ended its wait" if ended else "kept for its next wait_for"
        out.print(printable(f"event {event_name} sent to {name}: {what}"), markup=False)

    _run(go)
