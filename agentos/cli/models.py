"""``get models``, ``describe model NAME``, ``delete model NAME`` and ``usage --by model``.

A Model's spec is in Redis; what it is doing (replicas, health, calls in flight, cache
hit ratio, tokens per second) is known only to the daemons serving it, which report it
in their heartbeats. These commands put the two together. Credentials appear only as
the references the spec holds (``{env: VAR}``), never as values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from agentos.cli.common import Output, _client, _emit, _fail, _run, cell, out, printable
from agentos.client import Client, NotFound
from agentos.core.models import model_users
from agentos.core.modelspec import ModelSpec

__all__ = ["delete_model", "describe_model", "get_models", "model_details"]


async def model_details(client: Client) -> list[dict[str, Any]]:
    """Every applied Model with what the daemons serving it report, sorted by name."""
    specs = await client.store.models.read()
    daemons = await client.daemons()
    agents = await client.store.specs.agents()
    rows = []
    for name in sorted(specs):
        served = {
            d: info["models"][name]
            for d, info in sorted(daemons.items())
            if isinstance(info.get("models"), Mapping) and name in info["models"]
        }
        rows.append(
            {
                "name": name,
                "spec": specs[name].get("spec", {}),
                "agents": model_users(name, agents),
                "servedBy": served,
            }
        )
    return rows


def _totals(row: Mapping[str, Any]) -> dict[str, Any]:
    replicas = [r for s in row["servedBy"].values() for r in s.get("replicas", [])]
    prompt = sum(r.get("promptTokens", 0) for r in replicas)
    cached = sum(r.get("cachedTokens", 0) for r in replicas)
    healthy = sum(1 for r in replicas if r.get("healthy"))
    return {
        "replicas": f"{healthy}/{len(replicas)} healthy" if replicas else "-",
        "inFlight": sum(r.get("inFlight", 0) for r in replicas),
        "hit": f"{cached / prompt:.0%}" if prompt else "-",
    }


def _models_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(
        "MODEL",
        "ENGINE",
        "SERVED",
        "ENDPOINTS",
        "REPLICAS",
        "IN FLIGHT",
        "CACHE HIT",
        "AGENTS",
        "FALLBACK",
        box=None,
    )
    for row in rows:
        spec = row["spec"]
        t = _totals(row)
        table.add_row(
            *map(
                cell,
                (
                    row["name"],
                    spec.get("engine", ""),
                    spec.get("servedModel") or row["name"],
                    len(spec.get("endpoints", [])) or "embedded",
                    t["replicas"],
                    t["inFlight"],
                    t["hit"],
                    len(row["agents"]),
                    spec.get("fallback") or "-",
                ),
            )
        )
    return table


def _placement(spec: Mapping[str, Any]) -> str:
    """Tier, site, region and data boundary as the router sees them (defaults by engine)."""
    try:
        model = ModelSpec.model_validate(spec)
    except ValueError:
        return "-"
    placement = model.placement
    where: list[str] = [model.tier]
    if placement is not None and placement.site:
        where.append(f"site {placement.site}")
    if placement is not None and placement.region:
        where.append(f"region {placement.region}")
    tools = "" if model.tools_capable else ", no tool calls"
    return f"{', '.join(where)}; data stays within {model.data_boundary}{tools}"


def _describe_text(row: Mapping[str, Any]) -> str:
    spec = row["spec"]
    prices = spec.get("prices", {})
    lines = [
        f"Name:       {row['name']}",
        f"Engine:     {spec.get('engine')}",
        f"Served as:  {spec.get('servedModel') or row['name']}",
        f"Fallback:   {spec.get('fallback') or '-'}",
        f"Placement:  {_placement(spec)}",
        f"Prices/1k:  input {prices.get('input', 0)}, cached "
        f"{prices.get('cachedInput', prices.get('input', 0))}, output {prices.get('output', 0)}",
    ]
    creds = (spec.get("credentials") or {}).get("apiKey")
    if creds:
        where = f"env {creds['env']}" if "env" in creds else f"file {creds.get('file')}"
        lines.append(f"API key:    from {where}")
    lines.append(f"Agents:     {', '.join(row['agents']) or '-'}")
    if not row["servedBy"]:
        lines.append("Replicas:   no daemon serves it now (it starts with its first agent)")
    for daemon, info in row["servedBy"].items():
        lines.append(
            f"Daemon {daemon}: {info.get('slotsHeld', 0)} sessions held, "
            f"hibernation {info.get('hibernation', 'kv')}"
        )
        for r in info.get("replicas", []):
            state = "healthy" if r.get("healthy") else f"down ({r.get('lastError')})"
            lines.append(
                f"  {r['url']}: {state}, in flight {r.get('inFlight', 0)}, requests "
                f"{r.get('requests', 0)}, cache hit {r.get('cacheHitRatio', 0):.0%}, "
                f"{r.get('tokensPerSecond', 0)} tokens/s, throttled {r.get('throttles', 0)}x"
            )
    # lastError is upstream text: one line, no escapes of its own.
    return "\n".join(printable(line) for line in lines)


def get_models(output: Output) -> None:
    """`agentos get models`."""

    async def go() -> None:
        async with await _client() as client:
            rows = await model_details(client)
        _emit(rows, output, lambda: _models_table(rows))

    _run(go)


def describe_model(name: str, output: Output) -> None:
    """`agentos describe model NAME`."""

    async def go() -> None:
        async with await _client() as client:
            rows = [r for r in await model_details(client) if r["name"] == name]
        if not rows:
            _fail(f'model "{name}" not found', 1)
        _emit(rows[0], output, lambda: _describe_text(rows[0]))

    _run(go)


def delete_model(name: str) -> None:
    """`agentos delete model NAME`: refused while agents name it."""

    async def go() -> None:
        async with await _client() as client:
            users = model_users(name, await client.store.specs.agents())
            if users:
                _fail(f'model "{name}" is used by agents: {", ".join(users)}', 1)
            if not await client.store.specs.delete("Model", name):
                raise NotFound(f'model "{name}" not found')
        out.print(f"model/{name} deleted", markup=False)

    _run(go)
