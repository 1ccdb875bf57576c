"""The one message type, from an agent's inbox stream to the author's code and back.

A message is read from the inbox stream by the store, carried by the task that it
starts (:class:`agentos.core.tasks.Work`), handed to the agent as ``task.message`` and,
when the task waits durably, rebuilt from the task's record with every field it had.
One frozen value all the way, so no layer copies it field by field (and none loses a
field on the way).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Message"]


@dataclass(frozen=True, slots=True)
class Message:
    """A message from an agent's inbox.

    ``key`` is the sender's idempotency key, ``sent_at`` when it was sent (epoch
    seconds), ``traceparent`` the W3C trace context it was sent in, ``deliveries`` how
    many times the inbox handed it out (1 the first time; more after a crash).
    """

    id: str
    body: str
    key: str | None = None
    sent_at: float = 0.0
    traceparent: str | None = None
    deliveries: int = 1
