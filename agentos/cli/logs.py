"""``agentos logs NAME | -l SELECTOR [-f] [--since 10m] [--tail N] [-o json]``.

An agent's log (:mod:`agentos.store.logs.read`): what its code wrote with ``ctx.log`` and what
the runtime logged while it ran, from whichever daemon ran it. Lines are data: they are
escaped before they reach the terminal. ``-f`` keeps printing new lines; with a selector
it follows every agent whose labels match.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import anyio
import typer

from agentos.cli.common import (
    Output,
    OutputOpt,
    _client,
    _fail,
    _run,
    complete_agents,
    out,
    printable,
)
from agentos.client import Client
from agentos.core.durations import parse_duration
from agentos.store import LogLine

__all__ = ["logs", "parse_selector", "pick_agents", "selected"]

FOLLOW_POLL_S = 0.5


def parse_selector(text: str) -> dict[str, str]:
    """``key=value[,key=value…]`` as a dict; ValueError saying what is wrong."""
    found: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"{part.strip()!r} is not key=value")
        found[key.strip()] = value.strip()
    return found


def selected(bodies: Mapping[str, Mapping[str, Any]], selector: Mapping[str, str]) -> list[str]:
    """Names of the agents (name -> canonical body) whose labels hold every pair."""
    names = []
    for name, body in bodies.items():
        labels = (body.get("metadata") or {}).get("labels") or {}
        if all(labels.get(k) == v for k, v in selector.items()):
            names.append(name)
    return sorted(names)


def _line(entry: LogLine, output: Output) -> str:
    if output is not Output.table:
        return json.dumps(entry.to_dict())
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.time))
    task = f" [{entry.task}]" if entry.task else ""
    return printable(f"{stamp} {entry.agent} {entry.level}{task} {entry.message}")


async def pick_agents(
    client: Client, names: Sequence[str], selector: str | None, *, missing_exit: int = 2
) -> list[str]:
    """The agents named (each must exist: exit ``missing_exit`` naming the first that
    does not) or those ``selector`` selects (at least one, exit 2 otherwise); every agent
    with neither. A selector that does not parse exits 2."""
    bodies = await client.agent_specs()
    if names:
        missing = [n for n in names if n not in bodies]
        if missing:
            _fail(f'agent "{missing[0]}" not found', missing_exit)
        return list(names)
    if selector is None:
        return sorted(bodies)
    try:
        wanted = parse_selector(selector)
    except ValueError as e:
        _fail(f"-l: {e}", 2)
    found = selected(bodies, wanted)
    if not found:
        _fail(f"no agent has the labels {selector}", 2)
    return found


async def _follow(
    client: Client, names: Sequence[str], last: dict[str, str], output: Output
) -> None:
    store = client.store
    if len(names) == 1:  # one stream: a blocking read
        (name,) = names
        while True:
            for entry in await store.logs.after(name, last[name], block_ms=1000):
                out.print(_line(entry, output), markup=False, highlight=False)
                last[name] = entry.id
    while True:  # several: each looked at in turn (their slots may be on other nodes)
        for name in names:
            for entry in await store.logs.after(name, last[name]):
                out.print(_line(entry, output), markup=False, highlight=False)
                last[name] = entry.id
        await anyio.sleep(FOLLOW_POLL_S)


def logs(
    name: Annotated[
        str | None,
        typer.Argument(help="The agent (or use -l).", autocompletion=complete_agents),
    ] = None,
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="Agents whose labels match k=v[,k=v].")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="Only lines at most this old (e.g. 10m, 2h).")
    ] = None,
    tail: Annotated[int, typer.Option(min=1, max=10_000, help="The last N lines.")] = 100,
    output: OutputOpt = Output.table,
) -> None:
    """Print an agent's log: its ctx.log lines and the runtime's lines about it."""
    if (name is None) == (selector is None):
        _fail("give an agent's NAME or -l key=value, one of them", 2)
    since_at: float | None = None
    if since is not None:
        try:
            since_at = time.time() - parse_duration(since)
        except ValueError as e:
            _fail(f"--since: {e}", 2)

    async def go() -> None:
        async with await _client() as client:
            names = await pick_agents(client, [name] if name else [], selector)
            lines: list[LogLine] = []
            for agent in names:
                lines += await client.store.logs.read(agent, tail=tail, since=since_at)
            lines.sort(key=lambda entry: (entry.time, entry.id))
            for entry in lines[-tail:]:
                out.print(_line(entry, output), markup=False, highlight=False)
            if not follow:
                return
            last = {agent: "0-0" for agent in names}
            for entry in lines:
                last[entry.agent] = max(last[entry.agent], entry.id, key=_stream_order)
            await _follow(client, names, last, output)

    _run(go)


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)
