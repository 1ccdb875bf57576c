"""The old import path of the route, placement, evaluator and fleet price schema.

It moved to :mod:`agentos.core.spec.route` with the other resource schemas; this
module keeps ``from agentos.core.routespec import ...`` working.
"""

from agentos.core.spec.route import (
    BOUNDARY_PATTERN,
    AgentPlacement,
    Evaluate,
    FleetPrices,
    ModelCapabilities,
    ModelPlacement,
    ModelPrices,
    OnExhausted,
    Route,
    RouteStrategy,
    Tier,
    check_boundary,
    check_labels,
)

__all__ = [
    "BOUNDARY_PATTERN",
    "AgentPlacement",
    "Evaluate",
    "FleetPrices",
    "ModelCapabilities",
    "ModelPlacement",
    "ModelPrices",
    "OnExhausted",
    "Route",
    "RouteStrategy",
    "Tier",
    "check_boundary",
    "check_labels",
]
