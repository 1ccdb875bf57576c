"""The peer of bench/dispatch.py: arq no-op jobs on the same Redis.

Runs in the benchmark peers' virtual environment (``make bench`` creates
``.venv-bench-peers``; arq pins redis-py below 6). Two roles:

- ``worker URL JOBS``: one arq worker (``max_jobs`` 50, ``poll_delay`` 5 ms, or
  ``ARQ_POLL_DELAY_S``) with a no-op function; prints
  ``ready`` once it polls, then, after JOBS jobs ended, one JSON line with the time the
  last one ended.
- ``send URL JOBS SENDERS``: SENDERS concurrent tasks enqueue JOBS no-op jobs between
  them; prints one JSON line with the time of the first enqueue.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def worker(url: str, jobs: int) -> None:
    done = asyncio.Event()
    ended = 0
    last = 0.0

    async def after_job_end(ctx: dict[str, Any]) -> None:
        nonlocal ended, last
        ended += 1
        if ended >= jobs:
            last = time.time()
            done.set()

    w = Worker(
        functions=[noop],
        redis_settings=RedisSettings.from_dsn(url),
        max_jobs=50,
        # arq's default (0.5 s between polls, 250 jobs a poll) caps a worker near
        # 500 jobs/s; a short delay makes it the strongest peer it can be.
        poll_delay=float(os.environ.get("ARQ_POLL_DELAY_S", "0.005")),
        after_job_end=after_job_end,
        handle_signals=False,
    )
    run = asyncio.create_task(w.async_run())
    await asyncio.sleep(0.5)
    print("ready", flush=True)
    await done.wait()
    print(json.dumps({"last_done": last, "jobs": ended}), flush=True)
    run.cancel()
    await w.close()


async def send(url: str, jobs: int, senders: int) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    left = jobs
    first = 0.0

    async def sender() -> None:
        nonlocal left, first
        while left > 0:
            left -= 1
            if not first:
                first = time.time()
            await pool.enqueue_job("noop")

    await asyncio.gather(*(sender() for _ in range(senders)))
    print(json.dumps({"first_send": first, "sent": jobs}), flush=True)
    await pool.aclose()


if __name__ == "__main__":
    role, dsn, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "worker":
        asyncio.run(worker(dsn, count))
    else:
        asyncio.run(send(dsn, count, int(sys.argv[4])))
