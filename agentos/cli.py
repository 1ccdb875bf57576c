"""The `agentos` command: how operators run the daemon and look at the fleet.

Every command is a thin shell over :class:`agentos.client.Client` or
:class:`agentos.daemon.Daemon`. Settings come from flags and ``AGENTOS_*`` variables
here and nowhere else. Exit codes: 0 ok, 1 failure (Redis away, unknown agent, ...),
2 usage or validation error. Errors are one plain sentence; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import anyio
import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from agentos import __version__
from agentos.client import AgentSummary, Client, ClientError, read_message_arg, resolve_redis_url
from agentos.core.durations import parse_duration
from agentos.core.metering import Prices, UsageRow, total
from agentos.core.policy import ClassQuota, RuleStatus
from agentos.core.results import summarize
from agentos.core.spec import Document, SpecError, json_schema, load_paths
from agentos.daemon import Daemon
from agentos.engine import EngineError, create_engine
from agentos.ingress import build_app, is_loopback
from agentos.settings import DaemonSettings, Settings, new_daemon_id
from agentos.store import Event, Store, StoreUnavailable, redact_url
from agentos.store.embedded import EmbeddedRedis, EmbeddedRedisError
from agentos.telemetry import Telemetry

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="agentos",
    help="Run and operate fleets of always-on LLM agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
delete_app = typer.Typer(help="Delete an agent or a policy.", no_args_is_help=True)
app.add_typer(delete_app, name="delete")
policy_app = typer.Typer(help="Explain quota policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

# Agent names, results and errors are data: never emoji codes (":smile:") to replace.
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


class Output(enum.StrEnum):
    """How read commands print."""

    table = "table"
    json = "json"
    yaml = "yaml"


class Kind(enum.StrEnum):
    """What `agentos get` lists."""

    agents = "agents"
    policies = "policies"
    daemons = "daemons"


class OtelMode(enum.StrEnum):
    """Where traces and metrics go."""

    auto = "auto"
    console = "console"
    none = "none"


KeepOpt = Annotated[int, typer.Option(min=1, help="Task records kept per agent.")]
MaxAgeOpt = Annotated[
    str, typer.Option(help="Task records and idempotency keys are kept this long.")
]
OtelOpt = Annotated[
    OtelMode,
    typer.Option(help="auto: OTLP when OTEL_EXPORTER_OTLP_* is set; console: stderr; none."),
]
HttpOpt = Annotated[
    str | None,
    typer.Option(help="Serve webhooks and health checks on HOST:PORT (e.g. 127.0.0.1:8080)."),
]
HttpTokenOpt = Annotated[
    Path | None,
    typer.Option(help="File holding the bearer token for --http (or AGENTOS_HTTP_TOKEN)."),
]


class _State:
    settings: Settings = Settings()
    debug: bool = False


STATE = _State()

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="Print as a table, JSON or YAML.")
]
FilesOpt = Annotated[
    list[Path],
    typer.Option("--file", "-f", help="A YAML file or a folder of them (repeatable)."),
]


@app.callback()
def _main(
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            envvar="AGENTOS_REDIS_URL",
            help="Redis URL (redis://, rediss://, unix://). Default: the embedded server "
            "that `agentos up` starts under AGENTOS_HOME.",
            show_envvar=True,
        ),
    ] = None,
    namespace: Annotated[
        str,
        typer.Option(envvar="AGENTOS_NAMESPACE", help="Key prefix of this fleet in Redis."),
    ] = "agentos",
    home: Annotated[
        Path | None,
        typer.Option(envvar="AGENTOS_HOME", help="agentos home folder (default ~/.agentos)."),
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and debug logs.")] = False,
) -> None:
    settings = Settings.from_env({}, redis_url=redis, namespace=namespace, home=home)
    STATE.settings = settings
    STATE.debug = debug


# ---------------------------------------------------------------------- helpers


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning agentos errors into one line and an exit code."""
    try:
        return anyio.run(fn)
    except (typer.Exit, SystemExit):
        raise
    except BaseException as e:
        error = _leaf(e)
        if isinstance(error, (typer.Exit, SystemExit)):
            raise error from None
        if isinstance(error, KeyboardInterrupt):
            raise typer.Exit(130) from None
        if isinstance(error, SpecError):
            for issue in error.issues:
                err.print(str(issue), markup=False)
            err.print(f"{len(error.issues)} error(s); nothing was applied", markup=False)
            raise typer.Exit(2) from None
        if STATE.debug:
            raise
        if isinstance(error, (ClientError, StoreUnavailable, EmbeddedRedisError, EngineError)):
            _fail(str(error))
        _fail(
            f"internal error: {type(error).__name__}: {error} "
            "(run again with --debug for the traceback)"
        )


def _leaf(error: BaseException) -> BaseException:
    """The one real error inside task-group exception groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _command(action: Callable[[Client], Awaitable[object]], done: str) -> None:
    """Run one client call and print what was done."""

    async def go() -> None:
        async with await _client() as client:
            await action(client)
        out.print(done, markup=False)

    _run(go)


async def _client() -> Client:
    return await Client.connect(STATE.settings)


def _emit(data: Any, output: Output, table: Callable[[], Table | str]) -> None:
    if output is Output.json:
        out.print(json.dumps(data, indent=2, sort_keys=False, default=str), markup=False)
    elif output is Output.yaml:
        out.print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip(), markup=False)
    else:
        rendered = table()
        if isinstance(rendered, str):
            out.print(rendered, markup=False)
        else:
            _print_table(rendered)


_UNBOUNDED = 1 << 20


def _print_table(table: Table) -> None:
    """Print ``table`` fitted to the terminal, or with whole columns when piped.

    A pipe has no width: cutting to rich's default 80 columns would hand ``grep`` and
    ``awk`` ellipses (``AGENT-…``), so, like kubectl, a table that does not go to a
    terminal is rendered at its natural width, without trailing blanks.
    """
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update_width(_UNBOUNDED), table).maximum
    buffer = io.StringIO()
    wide = Console(file=buffer, width=max(natural, 1), highlight=False, emoji=False)
    wide.print(table)
    out.file.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))
    out.file.flush()


def _print_text(text: str) -> None:
    """Print ``text`` exactly (no markup, emoji codes or wrapping), then a newline."""
    out.file.write(text if text.endswith("\n") else text + "\n")
    out.file.flush()


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


def _agents_table(agents: Sequence[AgentSummary]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "PHASE", "RESTARTS", "TASKS", "STEPS", "KV", "ACTIVE", "OWNER", "REASON"):
        table.add_column(col, no_wrap=col != "REASON")
    colors = {"Running": "green", "Idle": "cyan", "Hibernated": "blue", "Failed": "red"}
    for a in agents:
        color = colors.get(a.phase, "yellow")
        table.add_row(
            a.name,
            f"[{color}]{a.phase}[/{color}]",
            str(a.restarts),
            str(a.tasks),
            str(a.steps),
            _size(a.kv_bytes),
            _ago(a.last_activity),
            a.owner or "-",
            a.reason,
        )
    return table


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


def _event_line(e: Event) -> str:
    stamp = datetime.fromtimestamp(e.time).strftime("%H:%M:%S") if e.time else "--:--:--"
    who = f"{e.agent}: " if e.agent else ""
    reason = f" ({e.reason})" if e.reason else ""
    return f"{stamp} {who}{e.type}{reason} {e.message}".rstrip()


def _load(files: Sequence[Path]) -> list[Document]:
    if not files:
        _fail("give at least one -f FILE or folder", 2)
    return load_paths(files)


def _setup_logging(level: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if STATE.debug else level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---------------------------------------------------------------------- desired state


@app.command()
def apply(
    files: FilesOpt,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and show the diff; change nothing.")
    ] = False,
) -> None:
    """Validate every document, then store them all (or none, if any is invalid)."""
    docs = _run_sync_load(files)

    async def go() -> None:
        async with await _client() as client:
            changes = await client.apply(docs, dry_run=dry_run)
            preview = None
            if dry_run and any(d.kind == "QuotaPolicy" for d in docs):
                preview, _, _ = await client.explain(documents=docs)
        suffix = " (dry run)" if dry_run else ""
        for c in changes:
            changed = f" ({', '.join(c.fields)})" if c.fields else ""
            out.print(f"{c.kind.lower()}/{c.name} {c.action}{changed}{suffix}", markup=False)
        if preview is not None:
            out.print("\neffective quotas after this apply (with the fleet's metrics now):")
            _print_table(_effective_table(list(preview.quotas.values())))

    _run(go)


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
        table.add_row(q.name, q.policy, limits, per_agent, ", ".join(q.rules) or "-")
    return table


def _run_sync_load(files: Sequence[Path]) -> list[Document]:
    try:
        return _load(files)
    except SpecError as e:
        for issue in e.issues:
            err.print(str(issue), markup=False)
        err.print(f"{len(e.issues)} error(s); nothing was applied", markup=False)
        raise typer.Exit(2) from None


@app.command()
def quota(output: OutputOpt = Output.table) -> None:
    """Effective limits per quota class and agent, usage now, and who is waiting."""

    async def go() -> None:
        async with await _client() as client:
            view = await client.quota()
        _emit(view, output, lambda: _quota_text(view))

    _run(go)


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
        table.add_row(
            f"[bold]{c['name']}[/bold]" + (f" ({c['policy']})" if c["policy"] else " (unlimited)"),
            "",
            _limit_cell(use["tokensLastMinute"], lim.get("tokensPerMinute")),
            _limit_cell(use["inFlight"], lim.get("maxConcurrent")),
            _limit_cell(use["dayTokens"], lim.get("dailyTokens")),
            _limit_cell(use["dayAgentSeconds"], lim.get("dailyAgentSeconds")),
            str(waiting) if waiting else "-",
            ", ".join(c["rules"]) or "-",
        )
        for a in c["agents"]:
            table.add_row(
                f"  {a['name']}",
                str(a["priority"]),
                _limit_cell(a["tokensLastMinute"], per.get("tokensPerMinute")),
                _limit_cell(a["inFlight"], per.get("maxConcurrent")),
                _limit_cell(a["dayTokens"], per.get("dailyTokens")),
                _limit_cell(a["dayAgentSeconds"], per.get("dailyAgentSeconds")),
                a["waiting"] or "-",
                "",
            )
    return table


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
    return "\n".join(lines)


@delete_app.command("agent")
def delete_agent(name: str) -> None:
    """Delete an agent: it stops, and its state, events and inbox are removed."""

    _command(lambda client: client.delete_agent(name), f"agent/{name} deleted")


@delete_app.command("policy")
def delete_policy(name: str) -> None:
    """Delete a QuotaPolicy."""

    _command(lambda client: client.delete_policy(name), f"quotapolicy/{name} deleted")


# ---------------------------------------------------------------------- reading


@app.command()
def get(kind: Kind, output: OutputOpt = Output.table) -> None:
    """List agents, policies or daemons."""

    async def go() -> None:
        async with await _client() as client:
            if kind is Kind.agents:
                agents = await client.agents()
                _emit([a.to_dict() for a in agents], output, lambda: _agents_table(agents))
            elif kind is Kind.policies:
                policies = await client.policies()
                _emit(list(policies.values()), output, lambda: _policies_table(policies))
            else:
                daemons = await client.daemons()
                _emit(
                    [{"id": k, **v} for k, v in daemons.items()],
                    output,
                    lambda: _daemons_table(daemons),
                )

    _run(go)


def _policies_table(policies: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "CLASSES", "RULES"):
        table.add_column(col)
    for name, body in sorted(policies.items()):
        spec = body.get("spec", {})
        table.add_row(name, ", ".join(spec.get("classes", {})), str(len(spec.get("rules", []))))
    return table


def _daemons_table(daemons: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("ID", "HOST", "PID", "ENGINE", "AGENTS", "SEEN"):
        table.add_column(col)
    for did, info in sorted(daemons.items()):
        table.add_row(
            did,
            str(info.get("host", "")),
            str(info.get("pid", "")),
            str(info.get("engine", "")),
            str(info.get("agents", "")),
            _ago(info.get("seen_at")) + " ago",
        )
    return table


@app.command()
def ps(output: OutputOpt = Output.table) -> None:
    """Show every agent's phase, restarts, tasks and last activity."""

    async def go() -> None:
        async with await _client() as client:
            agents = await client.agents()
        _emit([a.to_dict() for a in agents], output, lambda: _agents_table(agents))

    _run(go)


@app.command()
def describe(
    kind: Annotated[str, typer.Argument(help="Only `agent` for now.")],
    name: str,
    output: OutputOpt = Output.table,
) -> None:
    """Spec, status, recent events and last error (with traceback) of an agent."""
    if kind not in ("agent", "agents"):
        _fail(f"cannot describe {kind!r}: use `describe agent NAME`", 2)

    async def go() -> None:
        async with await _client() as client:
            detail = await client.describe(name)
        _emit(detail.to_dict(), output, lambda: _describe_text(detail.to_dict()))

    _run(go)


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
    ]
    if status.get("last_error"):
        lines += ["", f"Last error:    {status['last_error']}"]
        if status.get("last_traceback"):
            lines += ["", status["last_traceback"].rstrip()]
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
    return "\n".join(lines)


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


@app.command()
def events(
    name: Annotated[
        str | None, typer.Argument(help="An agent; the whole fleet if left out.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000)] = 50,
    output: OutputOpt = Output.table,
) -> None:
    """Recent events of an agent or the fleet, oldest first."""

    async def go() -> None:
        async with await _client() as client:
            if follow:
                async for e in client.follow_events(name, count=count):
                    _print_event(e, output)
                return
            items = await client.events(name, count=count)
        if output is Output.table:
            for e in items:
                out.print(_event_line(e), markup=False)
        else:
            _emit([e.to_dict() for e in items], output, lambda: "")

    _run(go)


def _print_event(e: Event, output: Output) -> None:
    if output is Output.table:
        out.print(_event_line(e), markup=False)
    else:
        out.print(json.dumps(e.to_dict()), markup=False)


# ---------------------------------------------------------------------- commands


@app.command()
def send(
    name: str,
    message: Annotated[str, typer.Argument(help="The text; @FILE reads a file, - reads stdin.")],
    key: Annotated[
        str | None, typer.Option(help="Idempotency key: a message with a key is run once.")
    ] = None,
    traceparent: Annotated[
        str | None, typer.Option(help="W3C traceparent to continue the sender's trace.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the task and print its result.")] = False,
    timeout: Annotated[str, typer.Option(help="How long --wait waits.")] = "60s",
    output: Annotated[
        Output,
        typer.Option(
            "--output", "-o", help="table: the result as stored; json|yaml: the task record."
        ),
    ] = Output.table,
) -> None:
    """Put a message in an agent's inbox; with --wait, print the task's result."""
    try:
        timeout_s = parse_duration(timeout)
    except ValueError as e:
        _fail(f"--timeout: {e}", 2)
    try:
        body = read_message_arg(message)
    except OSError as e:
        _fail(f"cannot read message file: {e}", 2)

    async def go() -> None:
        async with await _client() as client:
            msg_id = await client.send(name, body, key=key, traceparent=traceparent)
            if not wait:
                sent = {"agent": name, "messageId": msg_id, "taskId": f"m-{msg_id}"}
                _emit(sent, output, lambda: f"sent {msg_id} to {name}")
                return
            record = await client.wait_task(name, f"m-{msg_id}", timeout_s=timeout_s)
        if output is not Output.table:
            _emit(record, output, lambda: "")
        if record.get("status") == "failed":
            _fail(f"task m-{msg_id} failed: {record.get('error', '')}")
        if output is Output.table:
            _print_text(record.get("result", ""))

    _run(go)


@app.command()
def tasks(
    name: Annotated[str | None, typer.Argument(help="An agent; every agent if left out.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep refreshing.")] = False,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000)] = 20,
    output: OutputOpt = Output.table,
) -> None:
    """Recent tasks (one per wake-up) with their trigger, status, attempt and result."""

    async def go() -> None:
        async with await _client() as client:
            seen: dict[str, str] = {}
            while True:
                rows = await client.tasks(name, count=count)
                if not follow:
                    _emit(rows, output, partial(_tasks_table, rows))
                    return
                for row in reversed(rows):
                    key = row.get("id", "")
                    if seen.get(key) != row.get("status"):
                        seen[key] = row.get("status", "")
                        out.print(_task_line(row), markup=False)
                await anyio.sleep(1)

    _run(go)


def _tasks_table(rows: Sequence[dict[str, str]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("AGENT", "TASK", "TRIGGER", "STATUS", "ATTEMPT", "AGE", "TOOK", "RESULT"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*(Text(cell) for cell in _task_cells(row)))  # data, never markup
    return table


def _task_cells(row: dict[str, str]) -> list[str]:
    started, finished = row.get("started_at"), row.get("finished_at")
    took = f"{float(finished) - float(started):.2f}s" if started and finished else "-"
    detail = row.get("error") or row.get("result") or row.get("payload", "")
    return [
        row.get("agent", ""),
        row.get("id", ""),
        row.get("trigger", ""),
        row.get("status", ""),
        row.get("attempt", ""),
        _ago(float(row["created_at"])) if row.get("created_at") else "-",
        took,
        summarize(detail, _RESULT_CELL),
    ]


_RESULT_CELL = 80  # characters of a result in a table; `tasks NAME -o json` has it all


def _task_line(row: dict[str, str]) -> str:
    agent, task_id, trigger, status, attempt, _, took, detail = _task_cells(row)
    return f"{agent} {task_id} {trigger} {status} (attempt {attempt}, {took}) {detail}".rstrip()


class UsageBy(enum.StrEnum):
    """How `agentos usage` groups."""

    agent = "agent"
    class_ = "class"
    day = "day"


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


@app.command()
def usage(
    by: Annotated[
        UsageBy, typer.Option("--by", help="Group by agent, class or day.")
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
    table_prices = _load_prices(prices)

    async def go() -> None:
        async with await _client() as client:
            rows = await client.usage(by=by.value, since_days=days, prices=table_prices)
        everything = [*rows, total(rows)] if rows else []
        _emit([r.to_dict() for r in everything], output, partial(_usage_table, everything, by))

    _run(go)


def _usage_table(rows: Sequence[UsageRow], by: UsageBy) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in (
        by.value.upper(),
        "AGENT-HOURS",
        "TOKENS-IN",
        "TOKENS-OUT",
        "KV-GB-H",
        "TASKS",
        "FAILED",
        "COST",
        "COST/TASK",
    ):
        table.add_column(col, justify="left" if col == by.value.upper() else "right")
    for r in rows:
        per = "-" if r.cost_per_task is None else f"{r.cost_per_task:.6f}"
        table.add_row(
            r.key,
            f"{r.agent_hours:.4f}",
            str(r.tokens_in),
            str(r.tokens_out),
            f"{r.kv_gb_hours:.6f}",
            str(r.tasks_succeeded),
            str(r.tasks_failed),
            f"{r.cost:.6f}",
            per,
        )
    return table


@app.command()
def hibernate(name: str) -> None:
    """Hibernate an agent now (as soon as it is idle): KV and state go to Redis."""

    _command(lambda client: client.hibernate(name), f"agent/{name} hibernation requested")


@app.command()
def wake(name: str) -> None:
    """Wake an agent (restores its KV); also retries an agent that Failed."""

    _command(lambda client: client.wake(name), f"agent/{name} wake requested")


@app.command()
def schema() -> None:
    """Print the JSON Schema of Agent and QuotaPolicy documents (for editors)."""
    out.print(json.dumps(json_schema(), indent=2), markup=False)


@app.command()
def version() -> None:
    """Print the agentos version."""
    out.print(f"agentos {__version__}", markup=False)


# ---------------------------------------------------------------------- daemon


def _engine_options(
    engine: str, model: Path | None, slots: int | None, n_ctx: int | None
) -> dict[str, object]:
    options: dict[str, object] = {}
    if slots is not None:
        options["slots"] = slots
    if engine == "llama":
        options["home"] = STATE.settings.home
        if model is not None:
            options["model_path"] = model
        if n_ctx is not None:
            options["n_ctx"] = n_ctx
    elif model is not None or n_ctx is not None:
        _fail(f"--model and --n-ctx apply to the llama engine, not {engine!r}", 2)
    return options


def _daemon_settings(
    engine: str,
    max_agents: int | None,
    grace: str,
    daemon_id: str | None,
    lease_ttl: str,
    engine_options: dict[str, object],
    retention: tuple[int, str] = (1000, "7d"),
) -> DaemonSettings:
    values = {}
    keep, max_age = retention
    for flag, text in (("--grace", grace), ("--lease-ttl", lease_ttl), ("--task-max-age", max_age)):
        try:
            values[flag] = parse_duration(text)
        except ValueError as e:
            _fail(f"{flag}: {e}", 2)
    if values["--grace"] >= values["--lease-ttl"]:
        _fail("--grace must be shorter than --lease-ttl", 2)
    return DaemonSettings(
        daemon_id=daemon_id or new_daemon_id(),
        engine=engine,
        max_agents=max_agents,
        grace_s=values["--grace"],
        lease_ttl_s=values["--lease-ttl"],
        engine_options=engine_options,
        task_retention_count=keep,
        task_retention_s=values["--task-max-age"],
    )


EngineOpt = Annotated[
    str,
    typer.Option(help="Inference engine: llama (the real model, extra agentos[llama]) or sim."),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option(help="GGUF model file (llama). Default: Gemma 3 270M from PyPI, in AGENTOS_HOME."),
]
SlotsOpt = Annotated[
    int | None, typer.Option(min=1, help="Agents holding the model at once (engine slots).")
]
NCtxOpt = Annotated[int | None, typer.Option(min=256, help="Context tokens per agent (llama).")]
GraceOpt = Annotated[str, typer.Option(help="How long agents get to stop on shutdown.")]
LeaseOpt = Annotated[
    str,
    typer.Option(help="Agent lease length: how soon another daemon adopts this one's agents."),
]


@app.command()
def daemon(
    engine: EngineOpt = "sim",
    model: ModelOpt = None,
    slots: SlotsOpt = None,
    n_ctx: NCtxOpt = None,
    max_agents: Annotated[
        int | None, typer.Option(min=1, help="Agents this daemon runs at most.")
    ] = None,
    grace: GraceOpt = "10s",
    lease_ttl: LeaseOpt = "15s",
    daemon_id: Annotated[
        str | None, typer.Option("--id", help="Daemon id (default host-pid-random).")
    ] = None,
    http: HttpOpt = None,
    http_token_file: HttpTokenOpt = None,
    otel: OtelOpt = OtelMode.auto,
    task_retention: KeepOpt = 1000,
    task_max_age: MaxAgeOpt = "7d",
) -> None:
    """Run a daemon against an existing Redis (several may share one)."""
    _setup_logging(logging.INFO)
    options = _engine_options(engine, model, slots, n_ctx)
    dsettings = _daemon_settings(
        engine, max_agents, grace, daemon_id, lease_ttl, options, (task_retention, task_max_age)
    )
    where, token = _http_options(http, http_token_file)
    _run(lambda: _serve(_Serve(dsettings, http=where, http_token=token, otel=otel.value)))


@app.command()
def up(
    files: FilesOpt = [],  # noqa: B006 (typer reads the default)
    engine: EngineOpt = "sim",
    model: ModelOpt = None,
    slots: SlotsOpt = None,
    n_ctx: NCtxOpt = None,
    for_: Annotated[
        str | None, typer.Option("--for", help="Stop after this long (e.g. 30s).")
    ] = None,
    until_idle: Annotated[
        bool, typer.Option(help="Stop once nothing is queued or running and no trigger is due.")
    ] = False,
    grace: GraceOpt = "10s",
    lease_ttl: LeaseOpt = "15s",
    table: Annotated[
        bool | None, typer.Option(help="Live table (default: when a terminal).")
    ] = None,
    http: HttpOpt = None,
    http_token_file: HttpTokenOpt = None,
    otel: OtelOpt = OtelMode.auto,
    task_retention: KeepOpt = 1000,
    task_max_age: MaxAgeOpt = "7d",
) -> None:
    """Start Redis (embedded unless --redis), apply -f files and run a daemon in the foreground."""
    duration_s = None
    if for_ is not None:
        try:
            duration_s = parse_duration(for_)
        except ValueError as e:
            _fail(f"--for: {e}", 2)
    docs = _run_sync_load(files) if files else []
    _setup_logging(logging.WARNING)
    options = _engine_options(engine, model, slots, n_ctx)
    dsettings = _daemon_settings(
        engine, None, grace, None, lease_ttl, options, (task_retention, task_max_age)
    )
    live = sys.stdout.isatty() if table is None else table
    embedded = STATE.settings.redis_url is None
    where, token = _http_options(http, http_token_file)
    opts = _Serve(dsettings, docs, duration_s, until_idle, embedded, live, where, token, otel.value)
    _run(lambda: _serve(opts))


@dataclass(frozen=True)
class _Serve:
    """What `up` and `daemon` run: a daemon, and optionally Redis, specs and HTTP ingress."""

    daemon: DaemonSettings
    files: list[Document] = field(default_factory=list)
    duration_s: float | None = None
    until_idle: bool = False
    embedded: bool = False
    live: bool = False
    http: tuple[str, int] | None = None
    http_token: str | None = None
    otel: str = "auto"


def _http_options(
    http: str | None, token_file: Path | None
) -> tuple[tuple[str, int] | None, str | None]:
    """Parse --http HOST:PORT and find the bearer token (required off loopback)."""
    if http is None:
        return None, None
    host, sep, port = http.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"--http: expected HOST:PORT such as 127.0.0.1:8080, got {http!r}", 2)
    host = host.strip("[]")
    token = os.environ.get("AGENTOS_HTTP_TOKEN") or None
    if token_file is not None:
        try:
            token = token_file.read_text().strip() or None
        except OSError as e:
            _fail(f"--http-token-file: {e}", 2)
    if token is None and not is_loopback(host):
        _fail(
            f"--http {http}: a bearer token is required when listening beyond loopback; "
            "set AGENTOS_HTTP_TOKEN or --http-token-file",
            2,
        )
    return (host, int(port)), token


async def _serve(opts: _Serve) -> None:
    settings = STATE.settings
    dsettings = opts.daemon
    engine = create_engine(dsettings.engine, **dict(dsettings.engine_options))
    # Agents' entrypoints import relative to where the operator runs agentos.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    async with AsyncExitStack() as stack:
        if opts.embedded:
            server = EmbeddedRedis(settings.home)
            with _deaf_to_ctrl_c():
                url = server.start()
            stack.callback(server.stop)
            shown = redact_url(url)
            err.print(f"embedded Redis at {shown} (data in {server.data_dir})", markup=False)
            settings = replace(settings, redis_url=url)
        else:
            url = resolve_redis_url(settings)
        store = await Store.connect(url, namespace=settings.namespace)
        stack.push_async_callback(store.close)
        if opts.files:
            changes = await Client(store).apply(opts.files)
            for c in changes:
                err.print(f"{c.kind.lower()}/{c.name} {c.action}", markup=False)
        telemetry = Telemetry.from_env(opts.otel)
        stack.callback(telemetry.shutdown)
        d = Daemon(store, engine, dsettings, telemetry=telemetry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, d)
            if opts.live:
                tg.start_soon(_live_table, Client(store))
            else:
                tg.start_soon(_print_events, Client(store))
            if opts.http is not None:
                await tg.start(_serve_http, Client(store), d, opts.http, opts.http_token)
            await d.run(until_idle=opts.until_idle, duration_s=opts.duration_s)
            tg.cancel_scope.cancel()
        if opts.live:
            _print_table(_agents_table(await Client(store).agents()))


@contextlib.contextmanager
def _deaf_to_ctrl_c() -> Iterator[None]:
    """Child processes started inside do not stop on the terminal's Ctrl-C.

    Ctrl-C sends SIGINT to the whole foreground process group, so the embedded
    valkey-server used to shut down at once, while the daemon still had agents' state to
    save, leases to release and its heartbeat to remove ("cannot reach Redis"). Started
    with SIGINT blocked (a mask it inherits and never clears), the server stops only when
    `up` stops it with SIGTERM, after the daemon's and the live table's last calls.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


async def _serve_http(
    client: Client,
    d: Daemon,
    where: tuple[str, int],
    token: str | None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    import uvicorn

    app = build_app(client, token=token, ready=lambda: d.ready)
    config = uvicorn.Config(
        app, host=where[0], port=where[1], log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    # Signals belong to the daemon (graceful agent shutdown), not to uvicorn.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's answer to a port it cannot bind
            pass
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        # uvicorn exposes readiness as a plain attribute, not an event.
        while not server.started and not stopped.is_set():  # noqa: ASYNC110
            await anyio.sleep(0.02)
        if not server.started:
            raise ClientError(f"--http: cannot listen on {where[0]}:{where[1]}")
        err.print(f"HTTP ingress on http://{where[0]}:{where[1]}", markup=False)
        task_status.started()
        try:
            await stopped.wait()
        finally:
            server.should_exit = True


async def _watch_signals(d: Daemon) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for _ in signals:
            count += 1
            if count == 1:
                err.print("stopping agents (Ctrl-C again to cancel them now)", markup=False)
                d.request_stop()
            else:
                err.print("cancelling agents", markup=False)
                d.force_stop()


async def _live_table(client: Client) -> None:
    with Live(console=out, refresh_per_second=2, transient=True) as view:
        while True:
            with suppress(StoreUnavailable):
                view.update(_agents_table(await client.agents()))
            await anyio.sleep(1)


async def _print_events(client: Client) -> None:
    last = None
    while True:
        try:
            if last is None:
                last = "$"
                recent = await client.store.events(None, count=1)
                last = recent[-1].id if recent else "0-0"
            for e in await client.store.events(None, after_id=last, block_ms=1000, count=100):
                last = e.id
                err.print(_event_line(e), markup=False)
        except StoreUnavailable:
            await anyio.sleep(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
