"""``agentos eval NAME``: judge an agent's recorded tasks again with its evaluator.

An evaluator is code, and code gets fixed: after a change to ``spec.evaluate``'s
function (or to find out what an agent's past work was worth), the recorded tasks are
judged again and the success rates of ``agentos usage`` follow, since each changed
verdict's count moves in the usage of the day it was counted on. Running it twice
changes nothing the second time. The evaluator runs in this process, so its module
must be importable here (from the agent's ``codePath``, or this Python's path). Reasons
and errors are the evaluator's text: escaped before they reach the terminal.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from agentos.cli.common import (
    AgentArg,
    Output,
    OutputOpt,
    _client,
    _emit,
    _fail,
    _print_text,
    _run,
    cell,
)
from agentos.client_usage import EvalReport
from agentos.core.durations import parse_duration
from agentos.core.results import summarize

__all__ = ["eval_tasks"]

_REASON_WIDTH = 80


def _summary(report: EvalReport) -> str:
    summary = report.to_dict()["summary"]
    rate = summary["successRate"]
    line = (
        f"{summary['judged']} task(s) of {report.agent} judged by {report.evaluator}: "
        f"{summary['pass']} pass, {summary['fail']} fail, {summary['unknown']} unknown; "
        f"{summary['changed']} changed; success rate {'-' if rate is None else f'{rate:.1%}'}"
    )
    if summary["skipped"]:
        line += f"; {summary['skipped']} left alone (failed, cancelled or nothing done)"
    return line


def _eval_table(report: EvalReport) -> Table:
    table = Table(
        "TASK", "OLD", "NEW", "SCORE", "REASON", box=None, pad_edge=False, header_style="bold"
    )
    for row in report.rows:
        why = row.new.reason or (f"error: {row.new.error}" if row.new.error else "")
        table.add_row(
            cell(row.task_id),
            cell(row.old or "-"),
            cell(row.new.verdict),
            cell("-" if row.new.score is None else f"{row.new.score:g}"),
            cell(summarize(why, _REASON_WIDTH) if why else "-"),
        )
    return table


def eval_tasks(
    name: AgentArg,
    task: Annotated[
        str | None, typer.Option("--task", help="Judge only this task (its id).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only tasks created this recently (e.g. 7d, 12h); default: all kept."),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Run the agent's evaluator (spec.evaluate) again over its recorded tasks: update
    each verdict and the day's success counts (running it twice changes nothing)."""
    if task is not None and since is not None:
        _fail("give --task or --since, not both", 2)
    since_s = None
    if since is not None:
        try:
            since_s = parse_duration(since)
        except ValueError as e:
            _fail(f"--since: {e}", 2)

    async def go() -> None:
        async with await _client() as client:
            report = await client.evaluate_tasks(name, task_id=task, since_s=since_s)
        if report.rows or output is not Output.table:
            _emit(report.to_dict(), output, lambda: _eval_table(report))
        if output is Output.table:
            _print_text(_summary(report))  # names are data: escaped

    _run(go)
