"""What one agent used since the last flush: active seconds, tokens, KV byte-seconds, tasks.

The daemon's flush loop writes these amounts to the agent's daily usage hash; the
runner only adds to them. Active time is wall time in an active phase (not
hibernated, stopped, failed or pending); KV byte-seconds accrue for the committed
snapshot for as long as it is stored.

Each finished task is also counted once by its verdict (``tasks_pass``, ``tasks_fail``,
``tasks_unknown``), for the whole agent and for the model that served the task's last
call (the one whose answer was judged), so that ``usage`` can show success rates and
cost per successful task per agent and per model. The meter notes which models served
the running task from the per-model amounts it is given. A task that ended failed
(``tasks_failed``: a limit, retries run out, abandoned) is a ``fail`` verdict by the
runtime: counting it counts its verdict, wherever the runner counts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agentos.core.lifecycle import Phase
from agentos.core.modelusage import served_model, verdict_usage
from agentos.core.outcomes import Verdict
from agentos.telemetry import Telemetry

__all__ = ["ACTIVE_PHASES", "UsageMeter"]

ACTIVE_PHASES = frozenset({Phase.RUNNING, Phase.IDLE, Phase.WAKING, Phase.HIBERNATING})


class UsageMeter:
    """Amounts not yet written to the agent's daily usage hash."""

    def __init__(self, name: str, clock: Callable[[], float], telemetry: Telemetry) -> None:
        self.name = name
        self.clock = clock
        self.telemetry = telemetry
        self.kv_stored = 0  # bytes of the committed snapshot in Redis
        self._amounts: dict[str, float] = {}
        self._phase_since = clock()
        self._metered_at = clock()
        self._served: dict[str, None] = {}  # models of the running task, last call last

    def add(self, **amounts: float) -> None:
        """Count ``amounts`` (tokens_in, tokens_out, tasks_succeeded, ...); a failed task
        (``tasks_failed``) counts as a ``fail`` verdict too."""
        for k, v in amounts.items():
            self._amounts[k] = self._amounts.get(k, 0.0) + v
            model = served_model(k)
            if model is not None:
                self._served.pop(model, None)
                self._served[model] = None
        failed = amounts.get("tasks_failed", 0.0)
        if failed:
            self.judged("fail", failed)

    def begin_task(self) -> None:
        """A task starts: the models that served the one before are not its."""
        self._served = {}

    @property
    def served(self) -> tuple[str, ...]:
        """The models that served the running task, in the order of their last call."""
        return tuple(self._served)

    def judged(self, verdict: Verdict, count: float = 1.0) -> None:
        """Count ``count`` finished tasks as ``verdict``, for the agent and for the model
        that served the running task's last call."""
        last = next(reversed(self._served), None)
        for k, v in verdict_usage(verdict, last, count).items():
            self._amounts[k] = self._amounts.get(k, 0.0) + v

    def phase_ends(self, phase: Phase) -> None:
        """``phase`` ends now: its wall time counts as active if it was an active phase."""
        now = self.clock()
        if phase in ACTIVE_PHASES:
            self.add(active_s=now - self._phase_since)
        self._phase_since = now

    def set_kv_stored(self, nbytes: int) -> None:
        """The stored snapshot's size changes now (the old size accrues up to now)."""
        self._accrue_kv()
        self.kv_stored = nbytes

    def _accrue_kv(self) -> None:
        now = self.clock()
        self.add(kv_byte_s=self.kv_stored * (now - self._metered_at))
        self._metered_at = now

    def delta(self, phase: Phase) -> tuple[str, dict[str, float]]:
        """Usage since the last call (UTC day, amounts), and reset it."""
        self.phase_ends(phase)
        self._accrue_kv()
        delta, self._amounts = self._amounts, {}
        if delta.get("active_s"):
            self.telemetry.active_seconds.add(delta["active_s"], {"gen_ai.agent.name": self.name})
        return time.strftime("%Y-%m-%d", time.gmtime(self.clock())), delta
