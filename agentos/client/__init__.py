"""The programmatic interface to a fleet: apply specs, send messages, read status and events.

The CLI is built on :class:`Client` and nothing else, so whatever an operator can do at
the terminal a program can do too. A client talks to Redis only; it works whether or
not a daemon is running (commands then wait in Redis for one).

The package is cut by job, layered so that each module imports only those below it:
the façade (:mod:`~agentos.client.facade`), then what it delegates to (the desired
state in :mod:`~agentos.client.fleet`, commands, durable waits and ``agentos eval``),
then the reads (:mod:`~agentos.client.reports`, :mod:`~agentos.client.usage`), then
the data they return (:mod:`~agentos.client.views`) and the errors. Every name below
stays importable from ``agentos.client``.
"""

from agentos.client.commands import body_digest, read_message_arg
from agentos.client.errors import (
    AnswerRejected,
    EventsFull,
    InboxFull,
    InUse,
    NoRedisConfigured,
    SendConflict,
    TaskOver,
)
from agentos.client.facade import Client, resolve_redis_url
from agentos.client.fleet import spec_hash
from agentos.client.views import AgentDetail, AgentSummary
from agentos.core.errors import DEFAULT_MAX_MESSAGE_BYTES, ClientError, MessageTooLarge, NotFound

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AgentDetail",
    "AgentSummary",
    "AnswerRejected",
    "Client",
    "ClientError",
    "EventsFull",
    "InUse",
    "InboxFull",
    "MessageTooLarge",
    "NoRedisConfigured",
    "NotFound",
    "SendConflict",
    "TaskOver",
    "body_digest",
    "read_message_arg",
    "resolve_redis_url",
    "spec_hash",
]
