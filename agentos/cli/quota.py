"""The commands about what the fleet may spend and has spent.

``quota`` (effective limits and usage now), ``policy explain`` (why each rule holds
or not, and what it would change) and ``usage`` (agent-hours, tokens, tasks by verdict
and cost per successful task, by agent, class, route, model or day, priced from the
fleet's own specs: each Model's prices and ``QuotaPolicy.spec.prices``; what could not
be priced is said on stderr, so the table and the JSON stay what they are).
:mod:`agentos.cli` registers them on the app.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from agentos.cli.common import STATE, Output, OutputOpt, _client, _emit, _fail, _run, cell, err
from agentos.cli.render import _explain_text, _quota_text
from agentos.core.durations import parse_duration
from agentos.core.metering import UsageReport
from agentos.core.modelusage import ModelUsageRow, TaskCounts
from agentos.core.policy import RuleStatus

policy_app = typer.Typer(help="Explain quota policies.", no_args_is_help=True)


class UsageView(enum.StrEnum):
    """How `agentos usage` groups."""

    agent = "agent"
    class_ = "class"
    route = "route"
    model = "model"
    day = "day"


def quota(output: OutputOpt = Output.table) -> None:
    """Effective limits per quota class and agent, usage now, and who is waiting."""

    async def go() -> None:
        async with await _client() as client:
            view = await client.quota()
        _emit(view, output, lambda: _quota_text(view))

    _run(go)


@policy_app.command("explain")
def policy_explain(
    name: Annotated[str | None, typer.Argument(help="A policy; every policy if left out.")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every rule: its metric now, whether it holds, its state, and what it would change."""

    async def go() -> None:
        async with await _client() as client:
            result, metrics, measured_at = await client.explain(name)
        rules = [_rule_dict(r) for r in result.rules]
        data = {"metrics": metrics, "measuredAt": measured_at, "rules": rules}
        _emit(data, output, lambda: _explain_text(result.rules, metrics, measured_at))

    _run(go)


def _rule_dict(r: RuleStatus) -> dict[str, Any]:
    return {
        "policy": r.policy,
        "rule": r.rule,
        "class": r.class_,
        "metric": r.metric,
        "value": r.value,
        "condition": r.condition,
        "holds": r.holds,
        "heldFor": r.held_for_s,
        "state": r.state,
        "steps": r.steps,
        "waitFor": r.wait_s,
        "current": r.current.to_json(),
        "next": r.next.to_json() if r.next is not None else None,
        "message": r.message,
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _per(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _outcome_cells(tasks: TaskCounts, cost: float, tokens: int) -> list[str | int]:
    return [
        tasks.passed,
        tasks.failed,
        tasks.unknown,
        _rate(tasks.success_rate),
        _per(tasks.per_success(cost), 6),
        _per(tasks.per_success(tokens), 0),
    ]


_OUTCOME_COLUMNS = ("PASS", "FAIL", "UNKNOWN", "SUCCESS", "COST/SUCCESS", "TOKENS/SUCCESS")


def usage_table(report: UsageReport) -> Table:
    """The rows and total of ``report``; the outcome columns (verdicts, success rate,
    cost and tokens per successful task) once some usage counts tasks by verdict."""
    by = report.by
    outcomes = report.judged
    if by == "model":
        columns = ["MODEL", "CALLS", "TOKENS-IN", "CACHED", "TOKENS-OUT", "COST"]
    else:
        columns = [by.upper(), "AGENT-HOURS", "TOKENS-IN", "TOKENS-OUT", "KV-GB-H"]
        columns += ["TASKS", "FAILED", "COST", "COST/TASK"]
    if outcomes:
        columns += _OUTCOME_COLUMNS
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    rows = [*report.rows, report.total] if report.total is not None else []
    for r in rows:
        values: list[str | int]
        if isinstance(r, ModelUsageRow):
            values = [r.model, r.calls, r.tokens_in, r.tokens_cached, r.tokens_out]
            values.append(f"{r.cost:.6f}")
        else:
            per = "-" if r.cost_per_task is None else f"{r.cost_per_task:.6f}"
            values = [r.key, f"{r.agent_hours:.4f}", r.tokens_in, r.tokens_out]
            values += [f"{r.kv_gb_hours:.6f}", r.tasks_succeeded, r.tasks_failed]
            values += [f"{r.cost:.6f}", per]
        if outcomes:
            values += _outcome_cells(r.tasks, r.cost, r.tokens)
        table.add_row(*map(cell, values))
    return table


def _warn(lines: list[str] | tuple[str, ...]) -> None:
    for line in lines:
        err.print(Text.assemble(("warning:", "yellow"), " ", cell(line)), highlight=False)


_PRICES_MOVED = (
    "prices now live on Models (spec.prices: per 1k tokens) and on one QuotaPolicy "
    "(spec.prices: perAgentHour, perGBHourKV)"
)


def usage(
    by: Annotated[
        UsageView, typer.Option("--by", help="Group by agent, class, route, model or day.")
    ] = UsageView.agent,
    since: Annotated[str, typer.Option(help="How far back, in whole days (e.g. 7d, 30d).")] = "7d",
    prices: Annotated[
        Path | None, typer.Option(hidden=True, help="Removed: " + _PRICES_MOVED + ".")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Agent-hours, tokens, KV storage, tasks by verdict, success rate and cost per
    successful task; priced from each Model's prices and the fleet's QuotaPolicy prices."""
    if prices is not None:
        _fail(f"--prices was removed: {_PRICES_MOVED}; apply them with the fleet", 2)
    try:
        days = max(1, round(parse_duration(since) / 86400))
    except ValueError as e:
        _fail(f"--since: {e}", 2)
    legacy = STATE.settings.home / "prices.yaml"

    async def go() -> None:
        async with await _client() as client:
            report = await client.usage_report(by=by.value, since_days=days)
        if legacy.exists():
            _warn([f"{legacy} is ignored: {_PRICES_MOVED}"])
        _warn(report.warnings)
        _emit(report.to_json(), output, lambda: usage_table(report))

    _run(go)
