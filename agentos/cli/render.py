r"""How the fleet reads to a person: the tables and text of ``-o table``.

Functions of the data only (no client, no printing), kept apart from the commands so
that ``ps``, ``get``, ``up``'s live table and ``describe`` show an agent the same way,
and so that ``-o json``/``-o yaml`` stay the records as they are. Everything stored is
data written by agents, callers and upstream servers: table cells are :func:`cell`\ s
(never markup) and every field of a line goes through :func:`printable`, so a name or a
message cannot colour the terminal or start a line of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from agentos.cli.common import cell, printable
from agentos.client import AgentSummary
from agentos.core.placement import format_labels
from agentos.core.policy import ClassQuota, RuleStatus
from agentos.core.results import summarize
from agentos.store import Event


def _ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 60:
        return f"{delta:.0f}s"
    if delta < 3600:
        return f"{delta / 60:.0f}m"
    if delta < 86400:
        return f"{delta / 3600:.1f}h"
    return f"{delta / 86400:.1f}d"


def _size(nbytes: int) -> str:
    if nbytes <= 0:
        return "-"
    if nbytes < 1024:
        return f"{nbytes}B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f}{unit}"


def _agents_table(agents: Sequence[AgentSummary]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = (
        "NAME",
        "PHASE",
        "RESTARTS",
        "TASKS",
        "STEPS",
        "KV",
        "LAST-ACTIVE",
        "OWNER",
        "REASON",
    )
    for col in columns:
        table.add_column(col, no_wrap=col != "REASON")
    colors = {
        "Running": "green",
        "Idle": "cyan",
        "Hibernated": "blue",
        "Waiting": "magenta",
        "Failed": "red",
    }
    for a in agents:
        table.add_row(
            cell(a.name),
            cell(a.phase, colors.get(a.phase, "yellow")),
            cell(a.restarts),
            cell(a.tasks),
            cell(a.steps),
            cell(_size(a.kv_bytes)),
            cell(_ago(a.last_activity)),
            cell(a.owner or "-"),
            cell(a.reason),
        )
    return table


def _event_line(e: Event) -> str:
    """One event on one line, whatever its fields hold."""
    stamp = datetime.fromtimestamp(e.time).strftime("%H:%M:%S") if e.time else "--:--:--"
    who = f"{printable(e.agent)}: " if e.agent else ""
    reason = f" ({printable(e.reason)})" if e.reason else ""
    return f"{stamp} {who}{printable(e.type)}{reason} {printable(e.message)}".rstrip()


def _effective_table(quotas: Sequence[ClassQuota]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("CLASS", "POLICY", "LIMITS", "PER AGENT", "RULES IN EFFECT"):
        table.add_column(col)
    for q in sorted(quotas, key=lambda q: q.name):
        limits = q.limits.describe()
        if q.limits != q.base:
            limits += f" (declared {q.base.describe()})"
        per_agent = q.per_agent.describe()
        if q.per_agent != q.base_per_agent:
            per_agent += f" (declared {q.base_per_agent.describe()})"
        table.add_row(*map(cell, (q.name, q.policy, limits, per_agent, ", ".join(q.rules) or "-")))
    return table


def _limit_cell(value: float, limit: int | None) -> str:
    shown = f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"
    return f"{shown}/{limit:,}" if limit else shown


def _quota_text(view: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("CLASS/AGENT", "PRIO", "TOKENS/MIN", "IN FLIGHT", "TOKENS TODAY", "SECONDS TODAY",
                "WAITING", "RULES IN EFFECT"):  # fmt: skip
        table.add_column(col)
    for c in view["classes"]:
        lim, per, use = c["limits"], c["perAgent"], c["usage"]
        waiting = len(use["queued"]) + len(use["paced"])
        name = Text.assemble(
            cell(c["name"], "bold"),
            cell(f" ({c['policy']})" if c["policy"] else " (unlimited)"),
        )
        table.add_row(
            name,
            *map(
                cell,
                (
                    "",
                    _limit_cell(use["tokensLastMinute"], lim.get("tokensPerMinute")),
                    _limit_cell(use["inFlight"], lim.get("maxConcurrent")),
                    _limit_cell(use["dayTokens"], lim.get("dailyTokens")),
                    _limit_cell(use["dayAgentSeconds"], lim.get("dailyAgentSeconds")),
                    str(waiting) if waiting else "-",
                    ", ".join(c["rules"]) or "-",
                ),
            ),
        )
        for a in c["agents"]:
            table.add_row(
                *map(
                    cell,
                    (
                        f"  {a['name']}",
                        a["priority"],
                        _limit_cell(a["tokensLastMinute"], per.get("tokensPerMinute")),
                        _limit_cell(a["inFlight"], per.get("maxConcurrent")),
                        _limit_cell(a["dayTokens"], per.get("dailyTokens")),
                        _limit_cell(a["dayAgentSeconds"], per.get("dailyAgentSeconds")),
                        a["waiting"] or "-",
                        "",
                    ),
                )
            )
    return table


def _explain_text(
    rules: Sequence[RuleStatus], metrics: dict[str, float], measured_at: float | None
) -> str:
    lines = []
    if measured_at is None:
        lines.append("fleet metrics: none yet (no daemon has evaluated the policies)")
    else:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(metrics.items())) or "no data"
        lines.append(f"fleet metrics ({_ago(measured_at)} ago): {shown}")
    if not rules:
        lines.append("no rules")
    for r in rules:
        value = "no data" if r.value is None else f"{r.value:.3g}"
        lines.append("")
        lines.append(f"{r.policy}/{r.rule} -> class {r.class_}: {r.state}")
        lines.append(f"  when:  {r.condition}")
        now = f"{r.metric} = {value}, " if r.metric else ""
        held = f" for {r.held_for_s:.0f}s" if r.holds else ""
        lines.append(f"  now:   {now}{'holds' if r.holds else 'does not hold'}{held}")
        lines.append(f"  limits now: {r.current.describe()}")
        if r.next is not None:
            lines.append(f"  next change: {r.next.describe()}")
        if r.wait_s > 0:
            lines.append(f"  waits {r.wait_s:.0f}s more")
        lines.append(f"  {r.message}")
    return "\n".join(printable(line) for line in lines)


def _policies_table(policies: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "CLASSES", "RULES"):
        table.add_column(col)
    for name, body in sorted(policies.items()):
        spec = body.get("spec", {})
        table.add_row(
            *map(cell, (name, ", ".join(spec.get("classes", {})), len(spec.get("rules", []))))
        )
    return table


def _daemons_table(daemons: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("ID", "HOST", "PID", "ENGINE", "LABELS", "AGENTS", "SHARE", "SEEN"):
        table.add_column(col)
    for did, info in sorted(daemons.items()):
        # SHARE: the most agents it may hold (its fair share of the fleet plus the margin).
        share = "draining" if info.get("draining") else str(info.get("share") or "")
        labels = info.get("labels")
        shown = format_labels(labels) if isinstance(labels, dict) else ""
        table.add_row(
            *map(
                cell,
                (
                    did,
                    info.get("host", ""),
                    info.get("pid", ""),
                    info.get("engine", ""),
                    shown or "-",
                    info.get("agents", ""),
                    share,
                    _ago(info.get("seen_at")) + " ago",
                ),
            )
        )
    return table


def _describe_text(d: dict[str, Any]) -> str:
    status = d["status"]
    spec = d["spec"]["spec"]
    lines = [
        f"Name:          {d['name']}",
        f"Entrypoint:    {spec.get('entrypoint')}",
        f"Phase:         {status.get('phase', 'Pending')}"
        + (f" ({status['reason']})" if status.get("reason") else ""),
    ]
    if status.get("message"):
        lines.append(f"Message:       {status['message']}")
    lines += [
        f"Owner:         {status.get('owner') or '-'}",
        f"Priority:      {spec.get('priority')}   Quota class: {spec.get('quotaClass')}",
        f"Tasks:         {status.get('tasks_succeeded', 0)} succeeded, "
        f"{status.get('tasks_failed', 0)} failed; {status.get('steps', 0)} steps",
        f"Restarts:      {status.get('restarts', 0)}",
        f"Tokens:        {status.get('tokens_in', 0)} in, {status.get('tokens_out', 0)} out",
        f"Last activity: {_since(status.get('last_activity'))}",
        f"Inbox:         {d['inboxDepth']} waiting",
        f"Snapshot:      {_snapshot_text(status)}",
        f"Last wake:     {_wake_text(status)}",
        "Triggers:      " + (", ".join(_trigger_text(t) for t in spec.get("triggers", [])) or "-"),
        *_spec_lines(d["spec"]),
    ]
    if status.get("last_error"):
        lines += ["", f"Last error:    {status['last_error']}"]
        if status.get("last_traceback"):
            lines += ["", *status["last_traceback"].rstrip().split("\n")]
    lines += ["", "Recent tasks:"]
    if not d.get("tasks"):
        lines.append("  <none>")
    for row in d.get("tasks", []):
        lines.append("  " + _task_line(row))
    lines += ["", "Events:"]
    if not d["events"]:
        lines.append("  <none>")
    for e in d["events"]:
        stamp = datetime.fromtimestamp(e["time"]).strftime("%Y-%m-%d %H:%M:%S") if e["time"] else ""
        reason = f" ({e['reason']})" if e["reason"] else ""
        lines.append(f"  {stamp}  {e['type']}{reason}  {e['message']}")
    # Per line: a field's own newline is escaped, not a line of its own.
    return "\n".join(printable(line) for line in lines)


def _spec_lines(resource: dict[str, Any]) -> list[str]:
    """What the spec says beyond the status: model, labels, hibernation, tools, limits,
    config (one line each, left out when not set)."""
    spec = resource.get("spec", {})
    labels = (resource.get("metadata") or {}).get("labels") or {}
    hib = spec.get("hibernation") or {}
    idle = hib.get("idleAfter", "60s")
    route = spec.get("route")
    if isinstance(route, dict):
        model_line = (
            f"Route:         {route.get('strategy', 'cascade')} over "
            + " > ".join(route.get("models") or ())
            + f"; data {route.get('dataClass', 'any')}"
            + (f", ttft {route['ttftTarget']}" if route.get("ttftTarget") else "")
            + (f", max {route['maxCostPerTask']}/task" if "maxCostPerTask" in route else "")
            + f", exhausted: {route.get('onExhausted', 'park')}"
        )
    else:
        model_line = f"Model:         {spec.get('model', 'default')}" + (
            "" if spec.get("modelFallback", True) else " (no fallback)"
        )
    lines = [
        model_line,
        "Labels:        " + (", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"),
        f"Hibernation:   {'never' if idle in ('0s', 0) else f'after {idle} idle'}, "
        f"KV {hib.get('keepKV', 'auto')}",
    ]
    selector = (spec.get("placement") or {}).get("daemons") or {}
    if selector:
        lines.append(f"Placement:     daemons labelled {format_labels(selector)}")
    tools = spec.get("tools") or {}
    if tools.get("servers"):
        approvals = (tools.get("approval") or {}).get("required") or []
        lines.append(
            "Tool servers:  "
            + ", ".join(tools["servers"])
            + (f"; approval: {', '.join(approvals)}" if approvals else "")
        )
    limits = spec.get("limits") or {}
    if limits:
        lines.append("Limits:        " + ", ".join(f"{k} {v}" for k, v in limits.items()))
    if spec.get("config"):
        lines.append(f"Config:        {json.dumps(spec['config'], sort_keys=True)[:300]}")
    return lines


def _snapshot_text(status: dict[str, str]) -> str:
    if not status.get("snapshot_at"):
        return "-"
    kept = "KV kept" if status.get("kv_kept") == "1" else "token history only"
    return (
        f"{_size(int(status.get('kv_bytes') or 0))}, {status.get('kv_tokens', 0)} tokens, "
        f"{kept}, taken {_since(status.get('snapshot_at'))}"
    )


def _wake_text(status: dict[str, str]) -> str:
    if not status.get("wake_path"):
        return "-"
    return (
        f"{status['wake_path']} in {status.get('wake_ms', '?')} ms, {_since(status.get('woke_at'))}"
    )


def _since(stamp: str | None) -> str:
    return f"{_ago(float(stamp))} ago" if stamp else "-"


def _trigger_text(trigger: dict[str, Any]) -> str:
    for kind in ("schedule", "heartbeat", "every", "at"):
        if kind in trigger:
            return f"{kind} {trigger[kind]}"
    return "inbox"


def _tasks_table(rows: Sequence[dict[str, str]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("AGENT", "TASK", "TRIGGER", "STATUS", "VERDICT", "ATTEMPT", "AGE", "TOOK", "RESULT")
    for col in columns:
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*map(cell, _task_cells(row)))
    return table


def _task_cells(row: dict[str, str]) -> list[str]:
    started, finished = row.get("started_at"), row.get("finished_at")
    took = f"{float(finished) - float(started):.2f}s" if started and finished else "-"
    detail = row.get("error") or row.get("result") or row.get("payload", "")
    cells = [
        row.get("agent", ""),
        row.get("id", ""),
        row.get("trigger", ""),
        row.get("status", ""),
        row.get("verdict") or "-",
        row.get("attempt", ""),
        _ago(float(row["created_at"])) if row.get("created_at") else "-",
        took,
        summarize(detail, _RESULT_CELL),
    ]
    return [printable(c) for c in cells]


_RESULT_CELL = 80  # characters of a result in a table; `tasks NAME -o json` has it all


def _dead_table(letters: Sequence[dict[str, str]]) -> Table:
    """`agentos tasks NAME --dead`: one row per dead letter, newest first."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("TASK", "ATTEMPTS", "DIED", "ERROR", "MESSAGE"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    for d in letters:
        died = _ago(float(d["dead_at"])) if d.get("dead_at") else "-"
        table.add_row(
            *map(
                cell,
                (
                    d.get("task", ""),
                    d.get("attempts", ""),
                    died,
                    summarize(d.get("error", ""), _RESULT_CELL),
                    summarize(d.get("body", ""), _RESULT_CELL),
                ),
            )
        )
    return table


def _task_line(row: dict[str, str]) -> str:
    agent, task_id, trigger, status, verdict, attempt, _, took, detail = _task_cells(row)
    judged = "" if verdict == "-" else f", verdict {verdict}"
    line = f"{agent} {task_id} {trigger} {status} (attempt {attempt}, {took}{judged}) {detail}"
    return line.rstrip()
