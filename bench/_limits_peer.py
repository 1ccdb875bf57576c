"""The peer of bench/admission.py: the `limits` library's Redis moving-window strategy.

Runs in its own virtual environment (``make bench`` creates ``.venv-bench-peers``) so
that `limits` and its Redis client pins stay out of agentos's environment. Prints one
JSON object: admission decisions made and seconds taken, per thread count.
Usage: python bench/_limits_peer.py REDIS_URL SECONDS THREADS AGENTS
"""

from __future__ import annotations

import json
import sys
import threading
import time

from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter


def main() -> None:
    url, seconds, threads, agents = (
        sys.argv[1],
        float(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    limit = parse("1000000/minute")  # never refuses during the run: every hit is a full decision
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(index: int) -> None:
        limiter = MovingWindowRateLimiter(RedisStorage(url))
        n = 0
        while time.monotonic() < stop:
            for _ in range(50):
                if not limiter.hit(limit, "agent", str((index * 7919 + n) % agents)):
                    raise SystemExit("limits refused a hit: the limit is too low for the bench")
                n += 1
        counts[index] = n

    started = time.monotonic()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"decisions": sum(counts), "seconds": time.monotonic() - started}))


if __name__ == "__main__":
    main()
