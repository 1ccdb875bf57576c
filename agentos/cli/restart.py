"""`agentos restart` and `agentos rollout restart`: restart agents without cutting tasks.

A restart is graceful: the agent's daemon waits until its task ends (or ``--grace`` is
up), stops it (state saved, slot released, KV handed over) and starts it again with its
code loaded anew, then writes a ``Restarted`` event. An agent no daemon holds has
nothing to restart: its next activation loads the applied code. A rollout restarts the
selected agents in waves (``--batch`` at a time), each wave done before the next, and
reports its progress, like `kubectl rollout restart` and `kubectl rollout status`.
"""

from __future__ import annotations

import math
from typing import Annotated

import anyio
import typer

from agentos.cli.common import (
    Output,
    OutputOpt,
    _client,
    _emit,
    _fail,
    _run,
    complete_agents,
    out,
    printable,
)
from agentos.cli.logs import pick_agents
from agentos.client import Client
from agentos.core.durations import parse_duration

__all__ = ["restart", "rollout_app"]

rollout_app = typer.Typer(help="Restart agents in waves.", no_args_is_help=True)

SelectorOpt = Annotated[
    str | None, typer.Option("-l", "--selector", help="Agents whose labels match key=value[,…].")
]
GraceOpt = Annotated[
    str | None,
    typer.Option(
        "--grace",
        help="Longest wait for a running task to end (e.g. 30s); then the agent stops at "
        "its next step. Default: wait for the task, however long.",
    ),
]
TimeoutOpt = Annotated[
    str, typer.Option("--timeout", help="Longest wait for the restarts to be done.")
]


def _seconds(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        _fail(f"{option}: {e}", 2)


async def _restart_wave(
    client: Client, names: list[str], grace_s: float | None, timeout_s: float
) -> dict[str, str]:
    """Restart ``names`` together; name -> restarted | not running | pending."""
    marks = {name: await client.restart(name, grace_s=grace_s) for name in names}
    result = {n: "not running" for n, m in marks.items() if m is None}
    waiting = {n: m for n, m in marks.items() if m is not None}
    with anyio.move_on_after(timeout_s):
        while waiting:
            for name, mark in list(waiting.items()):
                if await client.restarted(name, mark):
                    result[name] = "restarted"
                    del waiting[name]
            if waiting:
                await anyio.sleep(0.1)
    result.update(dict.fromkeys(waiting, "pending"))
    return {n: result[n] for n in names}


def _say(name: str, outcome: str) -> str:
    if outcome == "restarted":
        return f"agent/{name} restarted"
    if outcome == "not running":
        return f"agent/{name} not running: its next activation loads its code anew"
    return f"agent/{name} restart requested; not done yet (a task still running?)"


def restart(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="[NAME]...", autocompletion=complete_agents)
    ] = None,
    selector: SelectorOpt = None,
    grace: GraceOpt = None,
    timeout: TimeoutOpt = "5m",
    output: OutputOpt = Output.table,
) -> None:
    """Restart agents gracefully: each once its task ends (state saved, slot released),
    with its code loaded anew. Name agents or select them with -l."""
    if not names and selector is None:
        _fail("name agents or select them: agentos restart NAME... | -l key=value", 2)
    if names and selector is not None:
        _fail("give names or -l, not both", 2)
    grace_s = _seconds("--grace", grace)
    timeout_s = _seconds("--timeout", timeout)
    assert timeout_s is not None

    async def go() -> None:
        async with await _client() as client:
            chosen = await pick_agents(client, names or [], selector)
            outcome = await _restart_wave(client, chosen, grace_s, timeout_s)
        rows = [{"agent": n, "outcome": o} for n, o in outcome.items()]
        _emit(rows, output, lambda: printable("\n".join(_say(n, o) for n, o in outcome.items())))
        if "pending" in outcome.values():
            raise typer.Exit(1)

    _run(go)


@rollout_app.command("restart")
def rollout_restart(
    selector: SelectorOpt = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch", min=1, help="Agents restarted at once (default: a quarter)."),
    ] = None,
    grace: GraceOpt = None,
    timeout: Annotated[
        str, typer.Option("--timeout", help="Longest wait for one wave to be done.")
    ] = "5m",
    output: OutputOpt = Output.table,
) -> None:
    """Restart every agent (or those selected with -l) in waves, each wave done before
    the next starts; a wave that does not finish in --timeout stops the rollout."""
    grace_s = _seconds("--grace", grace)
    timeout_s = _seconds("--timeout", timeout)
    assert timeout_s is not None

    async def go() -> None:
        async with await _client() as client:
            chosen = await pick_agents(client, [], selector)
            size = batch or max(1, math.ceil(len(chosen) / 4))
            waves = [chosen[i : i + size] for i in range(0, len(chosen), size)]
            rows: list[dict[str, object]] = []
            for number, wave in enumerate(waves, 1):
                outcome = await _restart_wave(client, wave, grace_s, timeout_s)
                done = sum(o != "pending" for o in outcome.values())
                rows += [{"wave": number, "agent": n, "outcome": o} for n, o in outcome.items()]
                if output is Output.table:
                    line = f"wave {number}/{len(waves)}: {done}/{len(wave)} done"
                    out.print(printable(line), markup=False)
                    for name, o in outcome.items():
                        out.print("  " + printable(_say(name, o)), markup=False)
                if done < len(wave):
                    if output is not Output.table:
                        _emit(rows, output, lambda: "")
                    _fail(f"wave {number} did not finish within {timeout}; rollout stopped")
        if output is Output.table:
            out.print(f"rollout restarted {len(chosen)} agent(s)", markup=False)
        else:
            _emit(rows, output, lambda: "")

    _run(go)
