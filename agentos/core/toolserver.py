"""The old import path of ``kind: ToolServer``.

The ToolServer schema and its name matching moved to :mod:`agentos.core.spec.toolserver`
with the other resource kinds; this module keeps ``from agentos.core.toolserver import
...`` working.
"""

from agentos.core.spec.toolserver import (
    PYTHON,
    AgentApproval,
    AgentTools,
    StdioServer,
    ToolApproval,
    ToolFilter,
    ToolServerResource,
    ToolServerSpec,
    ToolServerTimeouts,
    matches,
    model_tool_name,
    qualified,
    unreachable_approvals,
)

__all__ = [
    "PYTHON",
    "AgentApproval",
    "AgentTools",
    "StdioServer",
    "ToolApproval",
    "ToolFilter",
    "ToolServerResource",
    "ToolServerSpec",
    "ToolServerTimeouts",
    "matches",
    "model_tool_name",
    "qualified",
    "unreachable_approvals",
]
