"""The quota policy evaluator: from declared policies, fleet metrics and time to effective quotas.

A QuotaPolicy declares each class's limits and rules that rescale them while the fleet
runs ("halve batch's rate while the queue wait stays above 2s for 30s"). Whether a rule
fires, steps again, or gives way depends on how long its condition has held, on its
``for``, ``cooldown`` and ``stabilization``, so the evaluator carries a small memory per
rule from one evaluation to the next. Doing this in one pure function,
:func:`evaluate`, with ``now`` and that memory passed in and returned, lets every
daemon compute the same answer from what is stored in Redis, lets ``agentos policy
explain`` show why a limit is what it is, and lets tests replay hours of metrics in
microseconds. No I/O happens here: the caller reads the inputs and stores the results
(:meth:`ClassQuota.to_json`, :meth:`RuleMemory.to_json`).

Semantics in brief (the docstring of :func:`evaluate` has the details):

* A rule's condition holds when its metric is known and compares true, and the policy's
  local time is inside its hours and weekdays. A missing metric is "no data": it never
  holds.
* Once it has held for ``for``, the rule applies one step; a ``scale`` rule applies
  another every ``cooldown`` while it keeps holding (compounding), until the limits stop
  changing; a ``set`` rule has one step.
* When the condition has not held for ``stabilization``, the rule's steps are undone at
  once ("restored"); holding again before that keeps the rule in effect.

One module per job: :mod:`~agentos.core.policy.evaluation` (the evaluator),
:mod:`~agentos.core.policy.effects` (what a rule does to limits),
:mod:`~agentos.core.policy.conditions` (whether a condition holds, and the words for it)
and :mod:`~agentos.core.policy.quotas` (the records read and written). This module
re-exports the names callers use.
"""

from agentos.core.policy.conditions import METRIC_HELP
from agentos.core.policy.evaluation import base_quotas, evaluate
from agentos.core.policy.quotas import (
    Change,
    ClassQuota,
    Evaluation,
    Limits,
    RuleMemory,
    RuleStatus,
)

__all__ = [
    "METRIC_HELP",
    "Change",
    "ClassQuota",
    "Evaluation",
    "Limits",
    "RuleMemory",
    "RuleStatus",
    "base_quotas",
    "evaluate",
]
