"""Table tests for the pure decisions the runner performs: faults, task records, wake paths."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agentos.core.hibernation import plan_wake
from agentos.core.supervisor import Action, Fault, RestartPolicy, decide
from agentos.core.tasks import (
    Close,
    Requeue,
    Work,
    inbox_work,
    overlap_action,
    queued_record,
    resume_plan,
)

POLICY = RestartPolicy(crash_loop_after=3, initial_s=1.0, max_s=8.0)
NOW = 1000.0


@pytest.mark.parametrize(
    ("fault", "failures", "infra", "retry_after", "action", "delay", "after", "attempts", "crash"),
    [
        # the agent's own exceptions: backoff doubling, then Failed at the threshold
        (Fault.AGENT, 0, 0, 0.0, Action.RESTART, 1.0, 1, 0, True),
        (Fault.AGENT, 1, 0, 0.0, Action.RESTART, 2.0, 2, 0, True),
        (Fault.AGENT, 2, 0, 0.0, Action.FAIL, 0.0, 3, 0, True),
        # a quota that cannot wait: retried when it says, never a crash, count kept
        (Fault.RATE, 2, 0, 42.0, Action.RETRY, 42.0, 2, 0, False),
        (Fault.RATE, 0, 0, 0.0, Action.RETRY, 1.0, 0, 0, False),  # at least a second
        # a spent budget: parked until the day ends
        (Fault.BUDGET, 1, 0, 3600.0, Action.PARK, 3600.0, 1, 0, False),
        # infrastructure: its own backoff, 1 s doubling to 30 s, forever, never Failed
        (Fault.INFRA, 2, 0, 0.0, Action.RETRY, 1.0, 2, 1, False),
        (Fault.INFRA, 2, 3, 0.0, Action.RETRY, 8.0, 2, 4, False),
        (Fault.INFRA, 2, 50, 0.0, Action.RETRY, 30.0, 2, 51, False),
    ],
)
def test_decide(
    fault: Fault,
    failures: int,
    infra: int,
    retry_after: float,
    action: Action,
    delay: float,
    after: int,
    attempts: int,
    crash: bool,
) -> None:
    v = decide(
        fault,
        now=NOW,
        policy=POLICY,
        consecutive_failures=failures,
        infra_attempts=infra,
        retry_after_s=retry_after,
    )
    assert (v.action, v.delay_s, v.consecutive_failures, v.infra_attempts, v.crashed) == (
        action,
        delay,
        after,
        attempts,
        crash,
    )
    assert v.resume_at == NOW + delay


@dataclass(frozen=True)
class Msg:
    id: str
    body: str
    key: str | None = None


def test_queued_record_of_a_message_and_of_a_fire() -> None:
    work = inbox_work(Msg("1-0", "x" * 300, key="k"))
    assert work.id == "m-1-0"
    fields = queued_record(work, "echo", NOW)
    assert fields["status"] == "queued"
    assert fields["message_id"] == "1-0"
    assert fields["key"] == "k"
    assert fields["attempt"] == 0
    assert len(str(fields["payload"])) == 200  # cut, with an ellipsis
    fire = queued_record(Work("schedule", scheduled_at=900.0, index=2, attempt=3), "a", NOW)
    assert (fire["trigger_index"], fire["scheduled_at"], fire["attempt"]) == (2, "900.0", 2)
    assert "message_id" not in fire


def test_resume_plan_of_a_dead_owners_records() -> None:
    records = [
        {"id": "m-1", "trigger": "inbox", "message_id": "1"},  # message still pending
        {"id": "m-2", "trigger": "inbox", "message_id": "2"},  # acked with its state: done
        {
            "id": "t-3",
            "trigger": "schedule",
            "attempt": "1",
            "trigger_index": "0",
            "scheduled_at": "990.5",
        },
        {"id": "t-4", "trigger": "wake"},
    ]
    plan = resume_plan(records, pending={"1"}, now=NOW)
    assert [type(p) for p in plan] == [Close, Requeue, Requeue]
    close = plan[0]
    assert isinstance(close, Close)
    assert close.task_id == "m-2"
    assert close.fields["status"] == "succeeded"
    again = plan[1]
    assert isinstance(again, Requeue)
    assert (again.work.id, again.work.attempt, again.work.index, again.work.scheduled_at) == (
        "t-3",
        2,
        0,
        990.5,
    )
    assert again.work.recorded
    wake = plan[2]
    assert isinstance(wake, Requeue)
    assert (wake.work.trigger, wake.work.attempt, wake.work.index) == ("wake", 1, None)


@pytest.mark.parametrize(
    ("policy", "running", "fire", "action"),
    [
        ("skip", 0, 0, "skip"),
        ("queue", 0, 0, "queue"),
        ("cancelPrevious", 0, 0, "cancel-previous"),
        ("cancelPrevious", 1, 0, "queue-first"),  # another trigger's task: nothing to cancel
        ("cancelPrevious", None, 0, "queue-first"),  # a message's task
    ],
)
def test_overlap_action(policy: str, running: int | None, fire: int, action: str) -> None:
    assert overlap_action(policy, running_index=running, fire_index=fire) == action


@pytest.mark.parametrize(
    ("has_kv", "snap_fp", "tokens", "try_restore", "fallback", "reason"),
    [
        (True, "fp", 10, True, "recompute", "ok"),
        (True, "other", 10, False, "recompute", "snapshot from another engine"),
        (False, "fp", 10, False, "recompute", "ok"),  # token history only
        (False, None, 0, False, "empty", "ok"),  # nothing stored
    ],
)
def test_plan_wake(
    has_kv: bool, snap_fp: str | None, tokens: int, try_restore: bool, fallback: str, reason: str
) -> None:
    plan = plan_wake(
        has_kv=has_kv,
        snapshot_fingerprint=snap_fp,
        engine_fingerprint="fp",
        n_tokens=tokens,
        reason="ok",
    )
    assert (plan.try_restore, plan.fallback) == (try_restore, fallback)
    assert plan.reason.startswith(reason)
