"""``get toolservers``, ``describe toolserver NAME`` and ``delete toolserver NAME``.

A ToolServer's spec is in Redis; whether a daemon has it open (its tools, calls in
flight, how long it has been idle) is known only to the daemons, which report it in
their heartbeats. Secrets appear only as the references the spec holds (``{env:
VAR}``), never as values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from agentos.cli.common import Output, _client, _emit, _fail, _run, cell, out, printable
from agentos.client import Client, NotFound

__all__ = ["delete_toolserver", "describe_toolserver", "toolserver_details", "toolservers_table"]


def _users(name: str, agents: Mapping[str, Mapping[str, Any]]) -> list[str]:
    users = []
    for agent, body in agents.items():
        tools = (body.get("spec") or {}).get("tools") or {}
        if name in (tools.get("servers") or ()):
            users.append(agent)
    return sorted(users)


async def toolserver_details(client: Client) -> list[dict[str, Any]]:
    """Every applied ToolServer, the agents that use it and the daemons that have it
    open, sorted by name."""
    specs = await client.store.specs.toolservers()
    daemons = await client.daemons()
    agents = await client.store.specs.agents()
    rows = []
    for name in sorted(specs):
        open_in = {
            d: info["toolServers"][name]
            for d, info in sorted(daemons.items())
            if isinstance(info.get("toolServers"), Mapping) and name in info["toolServers"]
        }
        rows.append(
            {
                "name": name,
                "spec": specs[name].get("spec", {}),
                "agents": _users(name, agents),
                "openIn": open_in,
            }
        )
    return rows


def _where(spec: Mapping[str, Any]) -> str:
    stdio = spec.get("stdio")
    if stdio:
        return " ".join(stdio.get("command", []))
    return str(spec.get("url", ""))


def toolservers_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The table of ``get toolservers``."""
    table = Table(
        "TOOLSERVER", "TRANSPORT", "COMMAND/URL", "APPROVAL", "AGENTS", "OPEN IN", box=None
    )
    for row in rows:
        spec = row["spec"]
        required = (spec.get("approval") or {}).get("required") or []
        table.add_row(
            *map(
                cell,
                (
                    row["name"],
                    "stdio" if spec.get("stdio") else "http",
                    _where(spec),
                    ", ".join(required) or "-",
                    len(row["agents"]),
                    len(row["openIn"]),
                ),
            )
        )
    return table


def _ref(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"from env {value['env']}" if "env" in value else f"from file {value.get('file')}"
    return str(value)


def _describe_text(row: Mapping[str, Any]) -> str:
    spec = row["spec"]
    tools = spec.get("tools") or {}
    approval = spec.get("approval") or {}
    timeouts = spec.get("timeouts") or {}
    lines = [
        f"Name:       {row['name']}",
        f"Transport:  {'stdio' if spec.get('stdio') else 'Streamable HTTP'}",
        f"Command:    {_where(spec)}" if spec.get("stdio") else f"URL:        {_where(spec)}",
    ]
    stdio = spec.get("stdio") or {}
    if stdio.get("cwd"):
        lines.append(f"Directory:  {stdio['cwd']}")
    for key, value in (stdio.get("env") or {}).items():
        lines.append(f"Env:        {key} {_ref(value)}")
    for key, value in (spec.get("headers") or {}).items():
        lines.append(f"Header:     {key} {_ref(value)}")
    lines += [
        f"Tools:      allow {', '.join(tools.get('allow') or ['*'])}; "
        f"deny {', '.join(tools.get('deny') or ['-'])}",
        f"Idempotent: {', '.join(tools.get('idempotent') or ['(as the server marks them)'])}",
        f"Approval:   {', '.join(approval.get('required') or ['-'])} "
        f"(timeout {approval.get('timeout', '1h')}, "
        f"on timeout {approval.get('onTimeout', 'deny')})",
        f"Timeouts:   connect {timeouts.get('connect')}, call {timeouts.get('call')}",
        f"Agents:     {', '.join(row['agents']) or '-'}",
    ]
    if not row["openIn"]:
        lines.append("Open in:    no daemon (it starts with the first call of an agent)")
    for daemon, info in row["openIn"].items():
        lines.append(
            f"Daemon {daemon}: {info.get('tools', 0)} tools, in flight {info.get('inFlight', 0)}, "
            f"idle {info.get('idleS', 0)}s"
        )
    return "\n".join(printable(line) for line in lines)


def get_toolservers(output: Output) -> None:
    """`agentos get toolservers`."""

    async def go() -> None:
        async with await _client() as client:
            rows = await toolserver_details(client)
        _emit(rows, output, lambda: toolservers_table(rows))

    _run(go)


def describe_toolserver(name: str, output: Output) -> None:
    """`agentos describe toolserver NAME`."""

    async def go() -> None:
        async with await _client() as client:
            rows = [r for r in await toolserver_details(client) if r["name"] == name]
        if not rows:
            _fail(f'tool server "{name}" not found', 1)
        _emit(rows[0], output, lambda: _describe_text(rows[0]))

    _run(go)


def delete_toolserver(name: str) -> None:
    """`agentos delete toolserver NAME`: refused while agents name it."""

    async def go() -> None:
        async with await _client() as client:
            users = _users(name, await client.store.specs.agents())
            if users:
                _fail(f'tool server "{name}" is used by agents: {", ".join(users)}', 1)
            if not await client.store.specs.delete("ToolServer", name):
                raise NotFound(f'tool server "{name}" not found')
        out.print(f"toolserver/{name} deleted", markup=False)

    _run(go)
