"""The commands about what the fleet may spend and has spent.

``quota`` (effective limits and usage now), ``policy explain`` (why each rule holds
or not, and what it would change) and ``usage`` (agent-hours, tokens and cost per
task, priced from a YAML table). :mod:`agentos.cli` registers them on the app.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from agentos.cli.common import STATE, Output, OutputOpt, UsageBy, _client, _emit, _fail, _run
from agentos.cli.models import usage_by_model
from agentos.cli.render import _explain_text, _quota_text, _usage_table
from agentos.core.durations import parse_duration
from agentos.core.metering import Prices, total
from agentos.core.policy import RuleStatus

policy_app = typer.Typer(help="Explain quota policies.", no_args_is_help=True)


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


def _load_prices(path: Path | None) -> Prices:
    path = path or STATE.settings.home / "prices.yaml"
    if not path.exists():
        if path != STATE.settings.home / "prices.yaml":
            _fail(f"--prices: {path} does not exist", 2)
        return Prices()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return Prices.model_validate(data)
    except (OSError, yaml.YAMLError) as e:
        _fail(f"{path}: {e}", 2)
    except ValueError as e:
        _fail(f"{path}: {str(e).splitlines()[0]}: {'; '.join(str(e).splitlines()[1:3])}", 2)


def usage(
    by: Annotated[
        UsageBy, typer.Option("--by", help="Group by agent, class, day or model.")
    ] = UsageBy.agent,
    since: Annotated[str, typer.Option(help="How far back, in whole days (e.g. 7d, 30d).")] = "7d",
    prices: Annotated[
        Path | None,
        typer.Option(help="Price table YAML (default AGENTOS_HOME/prices.yaml if present)."),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Agent-hours, tokens, KV storage, tasks completed and cost per completed task."""
    try:
        days = max(1, round(parse_duration(since) / 86400))
    except ValueError as e:
        _fail(f"--since: {e}", 2)
    if by is UsageBy.model:
        usage_by_model(days, output)  # priced from each Model's own prices
        return
    table_prices = _load_prices(prices)

    async def go() -> None:
        async with await _client() as client:
            rows = await client.usage(by=by.value, since_days=days, prices=table_prices)
        everything = [*rows, total(rows)] if rows else []
        _emit([r.to_dict() for r in everything], output, partial(_usage_table, everything, by))

    _run(go)
