r"""Tools an agent acts through, and the toolbox that runs the calls its model asks for.

A tool is a Python function (sync or async) decorated with :func:`tool`: its parameters'
JSON Schema comes from the type hints (pydantic), its description from the docstring.
A :class:`Toolbox` holds an agent's tools (``Agent.tools``, and the tools of its MCP
servers, :mod:`agentos.tools.mcp`) and runs the :class:`~agentos.core.chat.ToolCall`\ s
a model asks for, returning the ``tool`` messages the model reads next.

Nothing a tool or a model does here is an agent crash: an unknown tool, arguments that
fail the schema or are not JSON, a tool that raises or runs past its timeout, all come
back to the model as an error result it can act on. Sync tools run in a worker thread,
never on the event loop (a blocked loop stalls every agent of the daemon). A tool
server that cannot answer is :class:`ToolServerUnavailable`, which the runtime treats
as the infrastructure's fault.

In a task the toolbox keeps a :class:`Ledger`: a call that needs a person's approval
parks the task first (like ``ctx.ask``), and every call's result is recorded (durably,
by the runtime) as soon as it returns, so a task that resumes or runs again replays it
instead of running the tool twice; a call of a tool that is not ``idempotent`` that
was cut short gives "interrupted: outcome unknown".
"""

from agentos.tools.base import (
    ArgumentsInvalid,
    Away,
    Tool,
    ToolError,
    ToolServerUnavailable,
    as_tool,
    tool,
)
from agentos.tools.box import Approval, Ledger, Outcome, Toolbox, ToolsArg, toolbox_of

__all__ = [
    "Approval",
    "ArgumentsInvalid",
    "Away",
    "Ledger",
    "Outcome",
    "Tool",
    "ToolError",
    "ToolServerUnavailable",
    "Toolbox",
    "ToolsArg",
    "as_tool",
    "tool",
    "toolbox_of",
]
