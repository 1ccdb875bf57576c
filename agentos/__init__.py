"""agentos: a declarative operating layer for fleets of always-on LLM agents.

Agent authors subclass :class:`Agent` and write async ``observe / plan / act /
learn``; programs operate a fleet through :class:`Client`. The names below are the
public surface (pinned by ``tests/unit/sdk/test_public_api.py``); everything else may change.
"""

from agentos.client import Client, ClientError, MessageTooLarge, NotFound
from agentos.core.chat import Reply, TokenUsage, ToolCall
from agentos.core.lifecycle import Phase, StopReason
from agentos.core.outcomes import Outcome
from agentos.core.spec import AgentResource, QuotaPolicyResource, SpecError, load_paths, parse_text
from agentos.engine.base import Completion, EngineError, NoFreeSlot, RouteExhausted
from agentos.sdk import LLM, Agent, Context, Message, QuotaExceeded, TaskInfo, Usage, WaitTimeout
from agentos.settings import Settings
from agentos.store import InboxFull
from agentos.tools import Tool, Toolbox, ToolError, tool

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "Agent",
    "AgentResource",
    "Client",
    "ClientError",
    "Completion",
    "Context",
    "EngineError",
    "InboxFull",
    "Message",
    "MessageTooLarge",
    "NoFreeSlot",
    "NotFound",
    "Outcome",
    "Phase",
    "QuotaExceeded",
    "QuotaPolicyResource",
    "Reply",
    "RouteExhausted",
    "Settings",
    "SpecError",
    "StopReason",
    "TaskInfo",
    "TokenUsage",
    "Tool",
    "ToolCall",
    "ToolError",
    "Toolbox",
    "Usage",
    "WaitTimeout",
    "__version__",
    "load_paths",
    "parse_text",
    "tool",
]
