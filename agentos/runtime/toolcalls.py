"""The runner's side of tool calls: an agent's server tools, its approvals, its ledger.

Three jobs, each a small object the runner holds and calls with arguments:

- :func:`approval_rule`: which of an agent's tools wait for a person (the tool's own
  ``approval``, its ToolServer's ``approval.required``, the agent's
  ``spec.tools.approval.required``) and how (the server's ``timeout`` / ``onTimeout``).
- :func:`attach_server_tools`: the tools of the agent's ToolServers join ``ctx.tools``
  at the start of each task (the daemon's :class:`~agentos.tools.mcp.ToolServerPool`
  opens a server on first use; the list is read again when it changed).
- :class:`LedgerWriter`: makes the task's tool ledger durable. Each call's result (and
  the start of a call that must not run twice) is written, fenced by the lease, into
  the task's record (``calls``: the model calls before it, ``tools``: the ledger) before
  the task does anything else; a task that resumes or runs again after its daemon died
  replays them (:meth:`agentos.core.waits.WaitLog.tool_entry`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from agentos.core.toolserver import AgentTools
from agentos.core.waits import WaitLog
from agentos.runtime.writer import Writer
from agentos.store import TaskWrite, Write
from agentos.tools import Approval, Tool, Toolbox

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["LedgerWriter", "approval_rule", "attach_server_tools"]


def approval_rule(agent_tools: AgentTools | None) -> Callable[[Tool], Approval | None]:
    """Whether a tool of this agent needs approval, and how that waits."""

    def rule(tool: Tool) -> Approval | None:
        needed = tool.approval or (
            agent_tools is not None and agent_tools.needs_approval(tool.display_name)
        )
        if not needed:
            return None
        return Approval(tool.approval_timeout_s, tool.approval_on_timeout)

    return rule


async def attach_server_tools(
    toolbox: Toolbox, pool: ToolServerPool, servers: Sequence[str]
) -> None:
    """Give ``toolbox`` the current tools of ``servers`` (each its own group). Raises
    ToolServerUnavailable naming a server that cannot be reached."""
    from agentos.tools.mcp import server_tool

    listed = await pool.tools(servers)
    for server in servers:
        toolbox.set_group(server, [server_tool(t, pool) for t in listed if t.server == server])


class LedgerWriter:
    """Writes a task's model calls and tool ledger into its record (fenced)."""

    def __init__(self, writer: Writer, log: WaitLog, task_id: Callable[[], str]) -> None:
        self._writer = writer
        self._log = log
        self._task_id = task_id
        self._lock = anyio.Lock()
        self.written = False  # since the last completed loop iteration

    async def persist(self) -> None:
        """Write what the log holds now; a later call writes a later state (in order)."""
        if not self._log.enabled:  # outside a task (a heartbeat's first observe)
            return
        async with self._lock:
            fields = {
                "calls": json.dumps(self._log.made),
                "tools": json.dumps(self._log.tools),
            }
            await self._writer.write(Write(tasks=(TaskWrite(self._task_id(), fields),)))
            self.written = True

    def cleared(self) -> dict[str, str] | None:
        """The fields that forget a completed iteration's ledger (None: none written)."""
        if not self.written:
            return None
        self.written = False
        return {"calls": "", "tools": ""}
