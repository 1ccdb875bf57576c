"""Durable waits as pure data and decisions: what a wait is, how it ends, how a task resumes.

An agent that calls ``ctx.ask`` / ``ctx.wait_for`` / ``ctx.sleep_until`` ends its running
loop iteration: the task is parked in Redis with a :class:`WaitRecord` (the question,
its choices, the deadline) and the agent is released. When the wait ends (an answer,
an event, the deadline) the task runs that iteration again; every wait it passes
returns, in order, what was recorded for it (:class:`Resolution`), and the model calls
it made before the wait are served from their record (:class:`WaitLog`). So the code
before a wait runs again and the code after it runs once.

This package decides, without I/O and with ``now`` given: whether an answer fits the
question (:func:`validate_answer`), what a wait resolves to at ``now``
(:func:`resolve`), and what a daemon that activates a waiting agent does with it
(:func:`on_activation`). The runtime (``agentos.runtime.waits``) and the store
(``agentos.store.waits``) perform what it returns.

One module per job: :mod:`~agentos.core.waits.records` (what a wait is and how it is
kept), :mod:`~agentos.core.waits.replay` (replaying an iteration) and
:mod:`~agentos.core.waits.decisions` (the decisions). This module re-exports the names
callers use.
"""

from agentos.core.waits.decisions import (
    MAX_CHOICES,
    MAX_QUESTION_CHARS,
    MAX_TEXT_ANSWER_CHARS,
    Discard,
    Repark,
    Resume,
    ask_spec,
    deadline_of,
    on_activation,
    resolve,
    validate_answer,
)
from agentos.core.waits.records import (
    APPROVAL,
    AnswerError,
    Resolution,
    WaitKind,
    WaitRecord,
    WaitRequested,
    WaitSpec,
    WaitTimeout,
)
from agentos.core.waits.replay import (
    MAX_TOOL_RECORD_CHARS,
    TOOL_RECORD_CUT,
    Resumed,
    WaitLog,
    tool_key,
)

__all__ = [
    "APPROVAL",
    "MAX_CHOICES",
    "MAX_QUESTION_CHARS",
    "MAX_TEXT_ANSWER_CHARS",
    "MAX_TOOL_RECORD_CHARS",
    "TOOL_RECORD_CUT",
    "AnswerError",
    "Discard",
    "Repark",
    "Resolution",
    "Resume",
    "Resumed",
    "WaitKind",
    "WaitLog",
    "WaitRecord",
    "WaitRequested",
    "WaitSpec",
    "WaitTimeout",
    "ask_spec",
    "deadline_of",
    "on_activation",
    "resolve",
    "tool_key",
    "validate_answer",
]
