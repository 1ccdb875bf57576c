"""Where the runner's shared pieces used to live (kept for the import paths).

The runner was one base class and three mixins; it is one class now
(:class:`agentos.runtime.runner.AgentRunner`) with its state in
:mod:`agentos.runtime.state`. :data:`INFRA_ERRORS` (errors under agent code that are the
infrastructure's, never the agent's) lives with the fault handling.
"""

from __future__ import annotations

from agentos.runtime.faults import INFRA_ERRORS

__all__ = ["INFRA_ERRORS"]
