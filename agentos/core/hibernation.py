"""Which agents to swap out, and whether their KV cache is worth keeping: pure decisions.

Restoring an agent's KV pays off when reading the snapshot back beats recomputing it:
``kv_bytes / read_bandwidth < tokens / prefill_speed`` (the InferCept / Continuum
idea). Both speeds are measured online by :class:`CostMeter` from real hibernations,
wakes and prefills, so the choice follows the machine and the Redis it actually has.
When slots run out, :func:`choose_victim` names the idle agent to swap out: lowest
priority first; among equals the one that attained the most service lately (it has had
its share, as in the governor's fair scheduling), then the least recently active; never
one that is mid-task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CostMeter",
    "KVDecision",
    "SlotHolder",
    "WakePlan",
    "choose_victim",
    "decide_keep_kv",
    "plan_wake",
]

# Starting points until the first measurements arrive (FACTS: loopback Redis, 2 cores).
DEFAULT_READ_BPS = 500e6
DEFAULT_WRITE_BPS = 200e6
DEFAULT_PREFILL_TPS = 650.0
IMPORT_OVERHEAD_S = 0.01  # llama.cpp's per-sequence import, measured at 4-10 ms


@dataclass(frozen=True, slots=True)
class KVDecision:
    """Whether to store the KV bytes, with the estimates behind the choice."""

    keep: bool
    restore_s: float
    recompute_s: float
    reason: str


def decide_keep_kv(
    policy: str, kv_bytes: int, tokens: int, *, read_bps: float, prefill_tps: float
) -> KVDecision:
    """Decide for ``keepKV`` = ``always`` | ``never`` | ``auto``.

    ``auto`` keeps the bytes only when restoring them (read + import) is estimated to
    be faster than re-prefilling ``tokens``. Without KV bytes there is nothing to keep.
    """
    restore_s = kv_bytes / max(read_bps, 1.0) + IMPORT_OVERHEAD_S
    recompute_s = tokens / max(prefill_tps, 1e-9)
    if kv_bytes <= 0:
        return KVDecision(False, restore_s, recompute_s, "no KV to keep")
    if policy == "always":
        return KVDecision(True, restore_s, recompute_s, "keepKV: always")
    if policy == "never":
        return KVDecision(False, restore_s, recompute_s, "keepKV: never")
    keep = restore_s < recompute_s
    verdict = "restore beats recompute" if keep else "recompute is as cheap as restore"
    return KVDecision(
        keep,
        restore_s,
        recompute_s,
        f"keepKV: auto ({verdict}: {restore_s * 1000:.1f} ms vs {recompute_s * 1000:.1f} ms)",
    )


class CostMeter:
    """Exponentially weighted estimates of store bandwidth and prefill speed."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.read_bps = DEFAULT_READ_BPS
        self.write_bps = DEFAULT_WRITE_BPS
        self.prefill_tps = DEFAULT_PREFILL_TPS

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def observe_read(self, nbytes: int, seconds: float) -> None:
        """A snapshot of ``nbytes`` was read back in ``seconds``."""
        if nbytes >= 1 << 20 and seconds > 0:  # small reads measure latency, not bandwidth
            self.read_bps = self._mix(self.read_bps, nbytes / seconds)

    def observe_write(self, nbytes: int, seconds: float) -> None:
        """A snapshot of ``nbytes`` was written in ``seconds``."""
        if nbytes >= 1 << 20 and seconds > 0:
            self.write_bps = self._mix(self.write_bps, nbytes / seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """``tokens`` were prefilled in ``seconds``."""
        if tokens >= 32 and seconds > 0:
            self.prefill_tps = self._mix(self.prefill_tps, tokens / seconds)


@dataclass(frozen=True, slots=True)
class SlotHolder:
    """An agent holding an engine slot, as the slot arbiter sees it."""

    name: str
    priority: int
    last_activity: float
    idle: bool  # False while it runs a task: never swapped out then
    attained: float = 0.0  # tokens used recently (decayed), see agentos.core.fairness


def choose_victim(holders: Sequence[SlotHolder], *, exclude: str = "") -> str | None:
    """The agent to hibernate to free a slot, or None when every holder is busy.

    Lowest priority first; among equals the most attained service (whole tokens, so
    long-idle agents whose usage has decayed away tie), then the least recently active;
    ties by name.
    """
    candidates = [h for h in holders if h.idle and h.name != exclude]
    if not candidates:
        return None
    return min(
        candidates, key=lambda h: (h.priority, -int(h.attained), h.last_activity, h.name)
    ).name


@dataclass(frozen=True, slots=True)
class WakePlan:
    """How to bring a hibernated context back: try the KV bytes first, or go straight
    to the fallback (re-prefill from the token history, or start empty)."""

    try_restore: bool
    fallback: Literal["recompute", "empty"]
    reason: str  # why not restore, when ``try_restore`` is False


def plan_wake(
    *,
    has_kv: bool,
    snapshot_fingerprint: str | None,
    engine_fingerprint: str,
    n_tokens: int,
    reason: str,
) -> WakePlan:
    """Decide the wake path from what the snapshot store returned.

    ``has_kv``: the snapshot verified and carries KV bytes; ``reason``: the store's
    word on it (missing, corrupt, partial, token history only). KV is restored only
    into the engine build and layout that wrote it; otherwise, and whenever the
    restore is refused, the token history is re-prefilled (or, without one, the
    context starts empty).
    """
    fallback: Literal["recompute", "empty"] = "recompute" if n_tokens else "empty"
    if not has_kv:
        return WakePlan(False, fallback, reason)
    if snapshot_fingerprint != engine_fingerprint:
        return WakePlan(False, fallback, "snapshot from another engine build or configuration")
    return WakePlan(True, fallback, reason)
