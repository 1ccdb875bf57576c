"""The commands on agents and their documents: what an operator types day to day.

``apply``, ``get``, ``ps``, ``describe``, ``events``, ``hibernate``, ``wake``,
``delete agent|policy``, and ``schema`` and ``version`` (``send`` and ``tasks``, the
commands on an agent's tasks, are in :mod:`agentos.cli.tasks`). Each is a thin shell
over one :class:`agentos.client.Client` call. :mod:`agentos.cli` registers them on the
app, in the order ``agentos --help`` lists them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    _run,
    _run_sync_load,
    complete_agents,
    out,
    printable,
)
from agentos.cli.logs import parse_selector, pick_agents, selected
from agentos.cli.models import _models_table, describe_model, model_details
from agentos.cli.render import (
    _agents_table,
    _daemons_table,
    _describe_text,
    _effective_table,
    _event_line,
    _policies_table,
)
from agentos.cli.tasks import send as send
from agentos.cli.tasks import tasks as tasks
from agentos.cli.toolservers import describe_toolserver, toolserver_details, toolservers_table
from agentos.client import AgentSummary
from agentos.core.spec import json_schema
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
            readers: dict[Kind, Callable[[], Awaitable[Mapping[str, Any]]]] = {
                Kind.agents: client.store.specs.agents,
                Kind.models: client.store.models.read,
                Kind.toolservers: client.store.specs.toolservers,
                Kind.policies: client.store.specs.policies,
            }
            keep = _wanted(which, names or [], selector, await readers[which]())
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
            keep = _wanted(Kind.agents, [], selector, await client.store.specs.agents())
            agents = [a for a in await client.agents() if keep(a.name)]
            _emit([a.to_dict() for a in agents], output, lambda: _agents_table(agents))
            if not watch:
                return
            # Like `kubectl get -w`: a line (or a JSON object) per agent that changed.
            seen = {a.name: _watched(a) for a in agents}
            while True:
                await anyio.sleep(1.0)
                specs = await client.store.specs.agents()
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
