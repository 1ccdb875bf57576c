"""What the client raises, by who must act: the caller (a bad answer, a full inbox) or no one.

The store raises its own errors (:mod:`agentos.store`); the client turns those a
caller can act on into these, which also carry the HTTP status the ingress answers
with. They live apart from the façade so that every module of the client raises the
same classes.
"""

from __future__ import annotations

from agentos.core.errors import ClientError
from agentos.store import EventsFull as _StoreEventsFull
from agentos.store import InboxFull as _StoreInboxFull
from agentos.store import SendConflict as _StoreSendConflict

__all__ = [
    "AnswerRejected",
    "EventsFull",
    "InUse",
    "InboxFull",
    "NoRedisConfigured",
    "SendConflict",
    "TaskOver",
]


class InboxFull(ClientError, _StoreInboxFull):
    """The agent's inbox holds ``maxDepth`` messages already (``depth``, ``limit``);
    nothing was enqueued: try again after ``retry_after_s`` (HTTP: 429, Retry-After)."""


class SendConflict(ClientError, _StoreSendConflict):
    """The send id (an HTTP ``Idempotency-Key``) already sent another body, as message
    ``message_id``; nothing was enqueued (HTTP: 409)."""


class EventsFull(ClientError, _StoreEventsFull):
    """The agent does not wait for the event and keeps as many events sent while it was
    not waiting as it may (by count or bytes); the event was not kept (HTTP: 429)."""


class InUse(ClientError):
    """The resource is still needed by others (a policy whose classes agents use)."""


class NoRedisConfigured(ClientError):
    """No Redis URL was given and no embedded server is running for this home."""


class AnswerRejected(Exception):
    """An answer or event that cannot be recorded; nothing changed.

    ``code`` says why: ``invalid`` (does not fit the question), ``not_waiting`` (the
    task does not wait, or no more), ``answered`` (someone answered first).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class TaskOver(ClientError):
    """A task that cannot be cancelled: it has ended (``status`` says how)."""

    def __init__(self, name: str, task_id: str, status: str) -> None:
        self.status = status
        super().__init__(f"task {task_id} of {name} is over already ({status})")
