"""Task outcomes: whether a task did its job, not only whether it raised.

A task that returned a wrong answer cost as much as one that returned a right one, so
"completed" is not enough to price agent work. An outcome is the verdict on one task:
``pass``, ``fail`` or ``unknown`` (nobody judged it, or its judge failed), with an
optional score in [0, 1] and a reason. The agent gives one (``ctx.succeed`` /
``ctx.fail``), or the Agent's ``spec.evaluate`` function does after the task; the
evaluator's verdict wins when both exist. Outcomes go on the task record, into the
daily usage counters (so ``usage`` shows success rate and cost per successful task) and
into the trace as OpenTelemetry's ``gen_ai.evaluation.result`` event. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PASS_SCORE", "VERDICTS", "Outcome", "Verdict", "outcome_of"]

Verdict = Literal["pass", "fail", "unknown"]
VERDICTS: tuple[Verdict, ...] = ("pass", "fail", "unknown")
PASS_SCORE = 0.5
"""A bare score at or above this passes."""
_MAX_REASON = 2000


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one task; ``source`` is ``agent`` or ``evaluator``; ``error`` says
    why an evaluator gave no verdict."""

    verdict: Verdict
    score: float | None = None
    reason: str | None = None
    source: str = "agent"
    error: str | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}; got {self.verdict!r}")
        if self.score is not None and not (
            isinstance(self.score, int | float) and math.isfinite(self.score)
        ):
            raise ValueError(f"score must be a finite number; got {self.score!r}")
        if self.reason is not None and len(self.reason) > _MAX_REASON:
            object.__setattr__(self, "reason", self.reason[:_MAX_REASON] + "…")

    def to_dict(self) -> dict[str, Any]:
        """The record's ``outcome`` field (keys left out when empty)."""
        out: dict[str, Any] = {"verdict": self.verdict, "source": self.source}
        if self.score is not None:
            out["score"] = self.score
        if self.reason:
            out["reason"] = self.reason
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outcome:
        """The inverse of :meth:`to_dict` (raises ValueError on a bad record)."""
        score = data.get("score")
        return cls(
            verdict=data.get("verdict", "unknown"),
            score=None if score is None else float(score),
            reason=data.get("reason"),
            source=str(data.get("source", "agent")),
            error=data.get("error"),
        )


def outcome_of(value: Any, *, source: str = "evaluator") -> Outcome:
    """An evaluator's return value as an outcome: True/False, ``"pass"``/``"fail"``/
    ``"unknown"``, a number (a score: passes at :data:`PASS_SCORE` or above), an
    :class:`Outcome`, or a mapping with ``verdict``/``pass``, ``score``, ``reason``.

    Raises ValueError saying what it got otherwise (the task's outcome is then unknown).
    """
    if isinstance(value, Outcome):
        return value
    if isinstance(value, bool):
        return Outcome("pass" if value else "fail", source=source)
    if isinstance(value, str):
        if value in VERDICTS:
            return Outcome(value, source=source)
        raise ValueError(f"expected pass, fail or unknown; got {value[:80]!r}")
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"the score is not a finite number: {value!r}")
        return Outcome("pass" if number >= PASS_SCORE else "fail", number, source=source)
    if isinstance(value, Mapping):
        score = value.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise ValueError(f"score must be a number; got {score!r}")
        verdict = value.get("verdict")
        if verdict is None and "pass" in value:
            verdict = "pass" if value["pass"] else "fail"
        if verdict is None and score is not None:
            verdict = "pass" if float(score) >= PASS_SCORE else "fail"
        if verdict not in VERDICTS:
            raise ValueError(f"expected a verdict of pass, fail or unknown; got {verdict!r}")
        reason = value.get("reason")
        return Outcome(
            verdict,
            None if score is None else float(score),
            None if reason is None else str(reason),
            source=source,
        )
    raise ValueError(f"an evaluator returns a bool, a verdict, a score or a mapping; got {value!r}")
