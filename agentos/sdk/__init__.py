"""What an agent author writes against: the Agent base class and the Context it is given.

An agent is a class with four async methods, called in a loop by the runtime:
``observe`` (is there anything to do? ``None`` means no, and the agent goes idle),
``plan``, ``act`` and ``learn``. Everything the agent may touch arrives through its
:class:`Context`: the model (``ctx.llm``), durable state (``ctx.state``), its config,
the task that woke it, a logger, and why it is being stopped. The runtime (a daemon,
or :mod:`agentos.testing`) builds the context; this package does no I/O of its own.

The package is cut by job, and every name stays importable from here:

* :mod:`agentos.sdk.agent`: the author's types (:class:`Agent`, :class:`StateCodec`,
  the logger and the frozen config);
* :mod:`agentos.sdk.llm`: the model handle (:class:`LLM`), with what a call takes from
  the runtime in :mod:`agentos.sdk.calls` and what it does when the context outgrows
  the model in :mod:`agentos.sdk.compaction`;
* :mod:`agentos.sdk.context`: the :class:`Context`, the :class:`TaskInfo` it carries
  and its durable waits.
"""

from agentos.core.chat import Reply
from agentos.core.fairness import QuotaExceeded
from agentos.core.messages import Message
from agentos.core.waits import WaitTimeout
from agentos.sdk.agent import Agent, StateCodec, agent_logger, freeze_config
from agentos.sdk.calls import Admission, Admitter, SessionProvider, Usage
from agentos.sdk.compaction import Compaction, compact_history
from agentos.sdk.context import Context, EventSender, Sender, TaskInfo
from agentos.sdk.llm import LLM

__all__ = [
    "LLM",
    "Admission",
    "Admitter",
    "Agent",
    "Compaction",
    "Context",
    "EventSender",
    "Message",
    "QuotaExceeded",
    "Reply",
    "Sender",
    "SessionProvider",
    "StateCodec",
    "TaskInfo",
    "Usage",
    "WaitTimeout",
    "agent_logger",
    "compact_history",
    "freeze_config",
]
