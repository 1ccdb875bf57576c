"""Where what `agentos ps` and `describe` show used to live: :mod:`agentos.client.views`.

Kept so that ``from agentos.client_views import ...`` goes on working.
"""

from agentos.client.views import (
    UNSCHEDULABLE,
    AgentDetail,
    AgentSummary,
    mark_unschedulable,
    unschedulable_agents,
    unschedulable_rows,
)

__all__ = [
    "UNSCHEDULABLE",
    "AgentDetail",
    "AgentSummary",
    "mark_unschedulable",
    "unschedulable_agents",
    "unschedulable_rows",
]
