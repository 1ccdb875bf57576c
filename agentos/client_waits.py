"""Where the client's durable waits used to live; they are in :mod:`agentos.client.waits`.

Kept so that ``from agentos.client_waits import ...`` goes on working; new code
imports from :mod:`agentos.client` (the errors) or :mod:`agentos.client.waits`.
"""

from agentos.client.errors import AnswerRejected, TaskOver
from agentos.client.waits import MAX_REASON_CHARS, answer, cancel_task, pending, send_event

__all__ = [
    "MAX_REASON_CHARS",
    "AnswerRejected",
    "TaskOver",
    "answer",
    "cancel_task",
    "pending",
    "send_event",
]
