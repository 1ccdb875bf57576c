"""The pure hibernation decisions: keep the KV or recompute, and whom to swap out."""

from __future__ import annotations

import pytest

from agentos.core.hibernation import CostMeter, SlotHolder, choose_victim, decide_keep_kv

MB = 1_000_000


@pytest.mark.parametrize(
    ("policy", "kv_bytes", "tokens", "keep"),
    [
        ("always", 20 * MB, 1, True),
        ("never", 20 * MB, 100_000, False),
        ("auto", 20 * MB, 4096, True),  # 50 ms read vs 6.3 s prefill
        ("auto", 20 * MB, 8, False),  # 8 tokens recompute in 12 ms: cheaper than 50 ms
        ("auto", 0, 4096, False),  # no KV to keep
        ("always", 0, 4096, False),
    ],
)
def test_keep_kv_follows_the_policy_and_the_costs(
    policy: str, kv_bytes: int, tokens: int, keep: bool
) -> None:
    decision = decide_keep_kv(policy, kv_bytes, tokens, read_bps=400 * MB, prefill_tps=650)
    assert decision.keep is keep
    assert decision.restore_s == pytest.approx(kv_bytes / (400 * MB) + 0.01)
    assert decision.recompute_s == pytest.approx(tokens / 650)
    assert (policy in decision.reason) or (kv_bytes == 0 and decision.reason == "no KV to keep")


def test_a_slow_store_tips_auto_towards_recompute() -> None:
    fast = decide_keep_kv("auto", 20 * MB, 512, read_bps=500 * MB, prefill_tps=650)
    slow = decide_keep_kv("auto", 20 * MB, 512, read_bps=5 * MB, prefill_tps=650)
    assert fast.keep
    assert not slow.keep


def test_the_meter_learns_from_large_observations_only() -> None:
    meter = CostMeter(alpha=1.0)
    meter.observe_read(1000, 1.0)  # too small to say anything about bandwidth
    assert meter.read_bps == pytest.approx(500e6)
    meter.observe_read(10 * MB, 0.1)
    assert meter.read_bps == pytest.approx(100 * MB)
    meter.observe_prefill(10, 1.0)
    assert meter.prefill_tps == pytest.approx(650)
    meter.observe_prefill(1000, 2.0)
    assert meter.prefill_tps == pytest.approx(500)
    meter.observe_write(2 * MB, 0.01)
    assert meter.write_bps == pytest.approx(200 * MB)


@pytest.mark.parametrize(
    ("holders", "victim"),
    [
        ([], None),
        ([SlotHolder("a", 50, 10.0, idle=False)], None),
        ([SlotHolder("a", 50, 10.0, idle=True), SlotHolder("b", 10, 99.0, idle=True)], "b"),
        ([SlotHolder("a", 50, 10.0, idle=True), SlotHolder("b", 50, 5.0, idle=True)], "b"),
        ([SlotHolder("a", 50, 5.0, idle=True), SlotHolder("b", 50, 5.0, idle=True)], "a"),
        ([SlotHolder("low", 1, 0.0, idle=False), SlotHolder("hi", 90, 0.0, idle=True)], "hi"),
        ([SlotHolder("me", 1, 0.0, idle=True), SlotHolder("x", 90, 0.0, idle=True)], "x"),
        # Among equals, the one that was served most lately gives way, before recency...
        (
            [
                SlotHolder("quiet", 50, 1.0, idle=True, attained=3.0),
                SlotHolder("heavy", 50, 9.0, idle=True, attained=5000.0),
            ],
            "heavy",
        ),
        # ...but never before priority; and usage decayed below one token is a tie.
        (
            [
                SlotHolder("heavy", 60, 1.0, idle=True, attained=5000.0),
                SlotHolder("quiet", 50, 9.0, idle=True, attained=0.0),
            ],
            "quiet",
        ),
        (
            [
                SlotHolder("old", 50, 1.0, idle=True, attained=0.4),
                SlotHolder("new", 50, 9.0, idle=True, attained=0.1),
            ],
            "old",
        ),
    ],
    ids=[
        "none",
        "busy-only",
        "lowest-priority",
        "least-recent",
        "tie-by-name",
        "never-mid-task",
        "not-the-requester",
        "most-served-first",
        "priority-before-service",
        "decayed-service-ties",
    ],
)
def test_choose_victim(holders: list[SlotHolder], victim: str | None) -> None:
    assert choose_victim(holders, exclude="me") == victim
