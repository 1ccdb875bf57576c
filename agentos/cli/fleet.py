"""The commands on agents and their documents: what an operator types day to day.

``apply``, ``get``, ``ps``, ``describe``, ``events``, ``send``, ``tasks``,
``hibernate``, ``wake``, ``delete agent|policy``, and ``schema`` and ``version``. Each
is a thin shell over one :class:`agentos.client.Client` call. :mod:`agentos.cli`
registers them on the app, in the order ``agentos --help`` lists them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Annotated, Any

import anyio
import typer

from agentos import __version__
from agentos.cli.common import (
    AgentArg,
    FilesOpt,
    Output,
    OutputOpt,
    _client,
    _command,
    _emit,
    _fail,
    _print_table,
    _print_text,
    _run,
    _run_sync_load,
    complete_agents,
    err,
    out,
    printable,
)
from agentos.cli.logs import parse_selector, pick_agents, selected
from agentos.cli.models import _models_table, describe_model, model_details
from agentos.cli.render import (
    _agents_table,
    _daemons_table,
    _dead_table,
    _describe_text,
    _effective_table,
    _event_line,
    _policies_table,
    _task_line,
    _tasks_table,
)
from agentos.cli.toolservers import describe_toolserver, toolserver_details, toolservers_table
from agentos.cli.waits import _who
from agentos.client import AgentSummary, read_message_arg
from agentos.core.durations import parse_duration
from agentos.core.machine import machine_record
from agentos.core.spec import json_schema
from agentos.core.taskview import DONE, describe_view
from agentos.store import Event


class Kind(enum.StrEnum):
    """What `agentos get` lists."""

    agents = "agents"
    policies = "policies"
    daemons = "daemons"
    models = "models"
    toolservers = "toolservers"


delete_app = typer.Typer(help="Delete an agent or a policy.", no_args_is_help=True)


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
            # A new hash of the agent's module file: its code was edited.
            fields = ["code changed" if f == "spec.codeHash" else f for f in c.fields]
            changed = f" ({', '.join(fields)})" if fields else ""
            out.print(f"{c.kind.lower()}/{c.name} {c.action}{changed}{suffix}", markup=False)
        if preview is not None:
            out.print("\neffective quotas after this apply (with the fleet's metrics now):")
            _print_table(_effective_table(list(preview.quotas.values())))

    _run(go)


@delete_app.command("agent")
def delete_agent(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="[NAME]...", autocompletion=complete_agents)
    ] = None,
    selector: Annotated[
        str | None,
        typer.Option("--selector", "-l", help="Delete the agents whose labels match k=v[,k=v]."),
    ] = None,
) -> None:
    """Delete agents (named, or selected with -l): each stops, and its state, events
    and inbox are removed."""
    if bool(names) == (selector is not None):
        _fail("name agents or select them: agentos delete agent NAME... | -l key=value", 2)

    async def go() -> None:
        async with await _client() as client:
            # All or nothing: an unknown name deletes none.
            chosen = await pick_agents(client, names or [], selector, missing_exit=1)
            for name in chosen:
                await client.delete_agent(name)
                out.print(printable(f"agent/{name} deleted"), markup=False)

    _run(go)


@delete_app.command("policy")
def delete_policy(name: str) -> None:
    """Delete a QuotaPolicy."""

    _command(lambda client: client.delete_policy(name), f"quotapolicy/{name} deleted")


_KINDS = {
    **dict.fromkeys(("agent", "agents"), Kind.agents),
    **dict.fromkeys(("policy", "policies", "quotapolicy", "quotapolicies"), Kind.policies),
    **dict.fromkeys(("daemon", "daemons"), Kind.daemons),
    **dict.fromkeys(("model", "models"), Kind.models),
    **dict.fromkeys(("toolserver", "toolservers"), Kind.toolservers),
}
SelectorOpt = Annotated[
    str | None,
    typer.Option("--selector", "-l", help="Only those whose labels match k=v[,k=v]."),
]


def _wanted(
    kind: Kind, names: Sequence[str], selector: str | None, bodies: Mapping[str, Any]
) -> Callable[[str], bool]:
    """Which names to show: the ones given (each must exist) and those the selector
    matches (a bad selector or an unknown name: one line and an exit code)."""
    missing = [n for n in names if n not in bodies]
    if missing:
        _fail(f'{kind.value.rstrip("s")} "{missing[0]}" not found', 1)
    chosen = set(names or bodies)
    if selector is not None:
        try:
            chosen &= set(selected(bodies, parse_selector(selector)))
        except ValueError as e:
            _fail(f"-l: {e}", 2)
    return chosen.__contains__


def get(
    kind: Annotated[
        str, typer.Argument(help="agents, policies, daemons, models or toolservers (or one).")
    ],
    names: Annotated[list[str] | None, typer.Argument(help="Only these.")] = None,
    selector: SelectorOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List agents, policies, daemons, models or tool servers (all, some, or by label)."""
    which = _KINDS.get(kind.lower())
    if which is None:
        _fail(f"cannot get {kind!r}: use one of {', '.join(k.value for k in Kind)}", 2)

    async def go() -> None:
        async with await _client() as client:
            if which is Kind.daemons:
                daemons = await client.daemons()
                labels = {d: dict(info.get("labels") or {}) for d, info in daemons.items()}
                keep = _wanted(which, names or [], selector, labels)
                daemons = {k: v for k, v in daemons.items() if keep(k)}
                _emit(
                    [{"id": k, **v} for k, v in daemons.items()],
                    output,
                    lambda: _daemons_table(daemons),
                )
                return
            bodies = {
                Kind.agents: client.store.agent_specs,
                Kind.models: client.store.models,
                Kind.toolservers: client.store.toolservers,
                Kind.policies: client.store.policies,
            }[which]
            keep = _wanted(which, names or [], selector, await bodies())
            if which is Kind.agents:
                agents = [a for a in await client.agents() if keep(a.name)]
                _emit([a.to_dict() for a in agents], output, lambda: _agents_table(agents))
            elif which is Kind.models:
                rows = [r for r in await model_details(client) if keep(r["name"])]
                _emit(rows, output, lambda: _models_table(rows))
            elif which is Kind.toolservers:
                servers = [r for r in await toolserver_details(client) if keep(r["name"])]
                _emit(servers, output, lambda: toolservers_table(servers))
            else:
                policies = {k: v for k, v in (await client.policies()).items() if keep(k)}
                _emit(list(policies.values()), output, lambda: _policies_table(policies))

    _run(go)


def ps(
    selector: SelectorOpt = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="After the table, print each agent again when it changes."
        ),
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Show every agent's phase, restarts, tasks and last activity (or those -l selects)."""

    async def go() -> None:
        async with await _client() as client:
            keep = _wanted(Kind.agents, [], selector, await client.store.agent_specs())
            agents = [a for a in await client.agents() if keep(a.name)]
            _emit([a.to_dict() for a in agents], output, lambda: _agents_table(agents))
            if not watch:
                return
            # Like `kubectl get -w`: a line (or a JSON object) per agent that changed.
            seen = {a.name: _watched(a) for a in agents}
            while True:
                await anyio.sleep(1.0)
                specs = await client.store.agent_specs()
                keep = _wanted(Kind.agents, [], selector, specs)
                for a in await client.agents():
                    if keep(a.name) and seen.get(a.name) != _watched(a):
                        seen[a.name] = _watched(a)
                        _watch_line(a, output)
                for gone in sorted(set(seen) - set(specs)):
                    del seen[gone]
                    if output is Output.table:
                        out.print(printable(f"{gone} deleted"), markup=False)

    _run(go)


def _watched(a: AgentSummary) -> tuple[object, ...]:
    """What `ps --watch` reports a change of (not the age of the last activity)."""
    return (a.phase, a.reason, a.owner, a.restarts, a.tasks, a.steps, a.kv_bytes)


def _watch_line(a: AgentSummary, output: Output) -> None:
    if output is Output.table:
        fields = (a.name, a.phase, a.restarts, a.tasks, a.steps, a.owner or "-", a.reason)
        out.print(printable("  ".join(str(f) for f in fields).rstrip()), markup=False)
    else:
        out.print(json.dumps(a.to_dict()), markup=False)


def describe(
    kind: Annotated[str, typer.Argument(help="`agent`, `model` or `toolserver`.")],
    name: AgentArg,
    output: OutputOpt = Output.table,
) -> None:
    """Spec, status, recent events and last error (with traceback) of an agent."""
    if kind in ("model", "models"):
        return describe_model(name, output)
    if kind in ("toolserver", "toolservers"):
        return describe_toolserver(name, output)
    if kind not in ("agent", "agents"):
        _fail(
            f"cannot describe {printable(kind)!r}: use `describe agent NAME`, "
            "`describe model NAME` or `describe toolserver NAME`",
            2,
        )

    async def go() -> None:
        async with await _client() as client:
            detail = await client.describe(name)
        _emit(detail.to_dict(), output, lambda: _describe_text(detail.stored()))

    _run(go)


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


def send(
    name: AgentArg,
    message: Annotated[str, typer.Argument(help="The text; @FILE reads a file, - reads stdin.")],
    key: Annotated[
        str | None, typer.Option(help="Idempotency key: a message with a key is run once.")
    ] = None,
    traceparent: Annotated[
        str | None, typer.Option(help="W3C traceparent to continue the sender's trace.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the task and print its result.")] = False,
    timeout: Annotated[str, typer.Option(help="How long --wait waits.")] = "60s",
    wait_answer: Annotated[
        bool,
        typer.Option(
            help="With --wait: keep waiting while the task waits for an answer (it prints "
            "the question and the `agentos answer` command), or return then."
        ),
    ] = True,
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
            task = f"m-{msg_id}"

            async def changed(view: dict[str, Any]) -> None:
                if view["status"] in ("waiting", "retrying", "parked"):
                    err.print(printable(describe_view(view)), markup=False)

            record = await client.wait_task(
                name, task, timeout_s=timeout_s, on_change=changed, until_waiting=not wait_answer
            )
            if record.get("status") == "waiting":  # --no-wait-answer
                if output is not Output.table:
                    _emit(await client.task_view(name, task), output, lambda: "")
                return
        if output is not Output.table:
            _emit(machine_record(record), output, lambda: "")
        if record.get("status") == "failed":
            _fail(f"task m-{msg_id} failed: {record.get('error', '')}")
        if output is Output.table:
            _print_text(record.get("result", ""))

    _run(go)


_TASK_ACTIONS = ("drop", "retry", "cancel")
_CANCEL_WAIT_S = 10.0  # how long `tasks cancel` waits to see the task end


def tasks(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="NAME | cancel NAME TASK | drop NAME TASK | retry NAME TASK",
            help="An agent (every agent if left out); or `cancel NAME TASK` to end a "
            "queued, running or waiting task (cancelled: not retried, not a crash), "
            "`drop NAME TASK` to remove a poison message for good (waiting in the inbox "
            "or a dead letter), `retry NAME TASK` to send a dead letter again.",
            show_default=False,
        ),
    ] = None,
    dead: Annotated[
        bool,
        typer.Option(
            "--dead", help="List the agent's dead letters (messages that failed too often)."
        ),
    ] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep refreshing.")] = False,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000)] = 20,
    as_: Annotated[
        str | None,
        typer.Option("--as", help="Who cancels, drops or retries (default: the OS user)."),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (cancel: kept with the task's event).")
    ] = "",
    output: OutputOpt = Output.table,
) -> None:
    """Recent tasks (one per wake-up) with their trigger, status, attempt and result;
    dead letters with --dead; `tasks cancel` to end a task; `tasks drop` and `tasks
    retry` for poison messages."""
    words = list(args or [])
    if len(words) == 3 and words[0] in _TASK_ACTIONS:
        return _task_action(*words, by=_who(as_), output=output, reason=reason)
    if len(words) > 1:
        _fail(
            "usage: agentos tasks [NAME] | tasks cancel|drop|retry NAME TASK",
            2,
        )
    name = words[0] if words else None
    if dead:
        if name is None:
            _fail("--dead needs an agent: agentos tasks NAME --dead", 2)
        return _dead_letters(name, count, output)

    async def go() -> None:
        async with await _client() as client:
            seen: dict[str, str] = {}
            while True:
                rows = await client.tasks(name, count=count)
                if not follow:
                    _emit([machine_record(r) for r in rows], output, partial(_tasks_table, rows))
                    return
                for row in reversed(rows):
                    key = row.get("id", "")
                    if seen.get(key) != row.get("status"):
                        seen[key] = row.get("status", "")
                        out.print(_task_line(row), markup=False)
                await anyio.sleep(1)

    _run(go)


def _task_action(
    action: str, name: str, task: str, *, by: str, output: Output, reason: str = ""
) -> None:
    async def go() -> None:
        async with await _client() as client:
            if action == "cancel":
                who = f"{by} ({reason})" if reason else by
                where = await client.cancel_task(name, task, by=who, reason=reason)
                status = await _settled_status(client, name, task)
                done = {"agent": name, "task": task, "was": where, "status": status}
                text = (
                    f"task {task} of {name} cancelled"
                    if status == "cancelled"
                    else f"task {task} of {name}: cancel requested (it was {where}; "
                    f"status {status} so far)"
                )
            elif action == "drop":
                where = await client.drop(name, task, by=by)
                done = {"agent": name, "task": task, "droppedFrom": where}
                text = f"task {task} of {name} dropped (from the {where})"
            else:
                msg_id = await client.retry_dead(name, task, by=by)
                done = {"agent": name, "task": task, "messageId": msg_id, "taskId": f"m-{msg_id}"}
                text = f"task {task} of {name} sent again as m-{msg_id}"
        _emit(done, output, lambda: printable(text))

    _run(go)


async def _settled_status(client: Any, name: str, task: str) -> str:
    """The task's status once it has ended, or as it is after a few seconds."""
    status = ""
    with anyio.move_on_after(_CANCEL_WAIT_S):
        while True:
            status = (await client.store.task(name, task)).get("status", "")
            if status in DONE:
                break
            await anyio.sleep(0.1)
    return status


def _dead_letters(name: str, count: int, output: Output) -> None:
    async def go() -> None:
        async with await _client() as client:
            letters = await client.dead_letters(name, count=count)
        _emit([machine_record(d) for d in letters], output, partial(_dead_table, letters))

    _run(go)


def hibernate(name: AgentArg) -> None:
    """Hibernate an agent now (as soon as it is idle): KV and state go to Redis."""

    async def go() -> None:
        async with await _client() as client:
            asked = await client.hibernate(name)
        done = "hibernation requested" if asked else "is hibernated already (no daemon runs it)"
        out.print(printable(f"agent/{name} {done}"), markup=False)

    _run(go)


def wake(name: AgentArg) -> None:
    """Wake an agent (restores its KV); also retries an agent that Failed."""

    _command(lambda client: client.wake(name), f"agent/{name} wake requested")


def schema() -> None:
    """Print the JSON Schema of Agent and QuotaPolicy documents (for editors)."""
    out.print(json.dumps(json_schema(), indent=2), markup=False)


def version() -> None:
    """Print the agentos version."""
    out.print(f"agentos {__version__}", markup=False)
