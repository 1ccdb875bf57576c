"""How many agents one daemon of a fleet may hold: the fair share, from the live daemons.

Daemons that share a Redis split the agents between them without a coordinator: each
one counts the live daemons in the heartbeat hash, computes the same share of the
fleet, and holds at most that share plus a margin. Under its limit a daemon takes free
agents; over it (a daemon joined, so the share shrank) it hands its idle ones over. The
margin is the hysteresis that keeps agents from bouncing between daemons: a daemon
sheds only above ``share + margin`` and takes only up to it, so one that just shed
never takes the same agents back, and small differences in when daemons look move
nothing. These are pure functions of the heartbeats and ``now``; the daemon performs
the result through :func:`agentos.core.reconcile.reconcile`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["HANDOVER_BATCH", "SHARE_MARGIN", "fair_share", "live_daemons", "share_limit"]

SHARE_MARGIN = 0.10
"""A daemon may hold its share plus this fraction of it (at least one agent more)."""

HANDOVER_BATCH = 20
"""At most this many agents of one daemon are being handed over at any moment: a daemon
far over its share (the first of several started together took everything) sheds in
waves instead of stopping hundreds of agents at once."""


def fair_share(agents: int, daemons: int) -> int:
    """``ceil(agents / daemons)``: what each of ``daemons`` live daemons should hold."""
    if agents <= 0:
        return 0
    return math.ceil(agents / max(1, daemons))


def share_limit(
    agents: int, daemons: int, *, capacity: int | None = None, margin: float = SHARE_MARGIN
) -> int:
    """The most agents one daemon may hold: its fair share plus the margin
    (``max(1, ceil(share * margin))``), and never more than its ``capacity``
    (``--max-agents``)."""
    share = fair_share(agents, daemons)
    limit = share + max(1, math.ceil(share * margin))
    return limit if capacity is None else min(capacity, limit)


def live_daemons(
    heartbeats: Mapping[str, Mapping[str, object]],
    now: float,
    *,
    me: str,
    fresh_s: float,
) -> int:
    """How many daemons share the fleet: those whose heartbeat's ``seen_at`` is newer
    than ``fresh_s`` before ``now`` and that are not ``draining``, counting ``me``
    always (a daemon that asks is alive, whether or not its heartbeat got through)."""
    live = {me}
    for daemon_id, info in heartbeats.items():
        seen_at = info.get("seen_at")
        if info.get("draining") or not isinstance(seen_at, int | float):
            continue
        if now - float(seen_at) < fresh_s:
            live.add(daemon_id)
    return len(live)
