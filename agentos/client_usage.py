"""Where the client's quota, usage and eval reads used to live.

They are in :mod:`agentos.client.usage` and :mod:`agentos.client.evals` now; this module
is kept so that ``from agentos.client_usage import ...`` goes on working.
"""

from agentos.client.evals import EVAL_MAX_TASKS, EvalReport, EvalRow, NoEvaluator, evaluate_tasks
from agentos.client.usage import (
    explain,
    price_book,
    quota,
    usage,
    usage_by_model,
    usage_report,
)

__all__ = [
    "EVAL_MAX_TASKS",
    "EvalReport",
    "EvalRow",
    "NoEvaluator",
    "evaluate_tasks",
    "explain",
    "price_book",
    "quota",
    "usage",
    "usage_by_model",
    "usage_report",
]
