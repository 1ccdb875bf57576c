"""Which replica serves an agent, and which model serves a call: pure routing decisions.

A server's prefix cache only pays when an agent's calls keep landing on the same
replica, so replicas are chosen by consistent hashing on the agent name: adding or
losing one replica moves only the agents that hashed to it. Unhealthy replicas are
skipped in ring order (the agent's second choice is stable too). Pure: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

__all__ = ["VNODES", "ring_order"]

VNODES = 64  # points per replica on the ring: spreads agents evenly over a few replicas


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def ring_order(key: str, replicas: Sequence[str]) -> list[int]:
    """Indexes of ``replicas`` (their stable ids, e.g. URLs) in the order ``key`` tries them.

    The first is the replica ``key`` hashes to; the rest follow clockwise on the ring,
    each replica once. Empty for no replicas.
    """
    if not replicas:
        return []
    ring = sorted(
        (_point(f"{rid}#{v}"), i) for i, rid in enumerate(replicas) for v in range(VNODES)
    )
    start = bisect.bisect(ring, (_point(key), len(replicas)))
    order: list[int] = []
    for offset in range(len(ring)):
        index = ring[(start + offset) % len(ring)][1]
        if index not in order:
            order.append(index)
            if len(order) == len(replicas):
                break
    return order
