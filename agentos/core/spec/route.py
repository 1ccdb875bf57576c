"""The schema of routes, placement, evaluators and fleet prices: where calls and agents may go.

A fleet mixes a small model next to the agent, a regional GPU server and a hosted API.
Which of them may see an agent's data, which daemons may host it, what a call may cost
and how fast it must start are declared here, next to the resources that use them:

- a Model's ``placement`` (tier, site, region, data boundary) and ``capabilities``;
- an Agent's ``route`` (candidates, data class, TTFT target, money budget, strategy),
  ``placement`` (a node selector over daemon labels) and ``evaluate`` (a verdict on
  each task);
- a QuotaPolicy's fleet ``prices`` (per agent-hour and per GB-hour of stored KV).

The decisions over them live in :mod:`agentos.core.route`. Pure: validation only.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from agentos.core.durations import PositiveDuration
from agentos.core.specbase import Name, _error, _Model

__all__ = [
    "BOUNDARY_PATTERN",
    "AgentPlacement",
    "Evaluate",
    "FleetPrices",
    "ModelCapabilities",
    "ModelPlacement",
    "ModelPrices",
    "Route",
    "RouteStrategy",
    "Tier",
    "check_boundary",
]

Tier = Literal["local", "regional", "hosted"]
RouteStrategy = Literal["cascade", "cheapest", "fastest"]
OnExhausted = Literal["park", "fail"]

BOUNDARY_PATTERN = r"^(host|site|any|region:[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"
_BOUNDARY = re.compile(BOUNDARY_PATTERN)
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def check_boundary(value: str) -> str:
    """``value`` if it is a data boundary (``host``, ``site``, ``region:NAME``, ``any``)."""
    if not isinstance(value, str) or not _BOUNDARY.fullmatch(value):
        raise ValueError(f"expected host, site, region:NAME or any; got {value!r}")
    return value


def check_labels(labels: dict[str, str], what: str) -> dict[str, str]:
    """``labels`` if every key and value is a plain label (letters, digits, ``-_.``)."""
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"{what}: {key!r} is not a label name (letters, digits, -_./)")
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ValueError(f"{what}: {key}={value!r} is not a label value (letters, digits, -_.)")
    return labels


class ModelPlacement(_Model):
    """Where a Model runs, and how far the data sent to it may travel.

    ``tier`` left out: ``local`` for a model the daemon runs (llama, sim, an embedded
    llamaserver), else ``hosted``. ``dataBoundary`` left out: ``host`` for a local model,
    ``site`` for a regional one, ``any`` for a hosted one. A local model with a ``site``
    is served only by the daemons labelled with that site.
    """

    tier: Tier | None = None
    site: Name | None = None
    region: Name | None = None
    data_boundary: str | None = None

    @field_validator("data_boundary")
    @classmethod
    def _boundary(cls, value: str | None) -> str | None:
        return None if value is None else check_boundary(value)


class ModelCapabilities(_Model):
    """What a model can do: tool calls, and how long a context it takes (None: the
    Model's ``contextLength``, or unknown)."""

    tools: bool = True
    context_length: int | None = Field(default=None, gt=0, strict=True)


class Route(_Model):
    """``spec.route``: the models an agent's calls may go to and how one is chosen."""

    models: tuple[Name, ...] = Field(min_length=1)
    # Never send this agent's data past this boundary (a hard filter).
    data_class: str = "any"
    # The time to first token each call should meet; slower models are skipped.
    ttft_target: PositiveDuration | None = None
    # Money per task, in the Models' price unit; a call that would pass it is sent to a
    # cheaper model, or the task parks with BudgetExhausted.
    max_cost_per_task: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)
    strategy: RouteStrategy = "cascade"
    # Every candidate down, throttled or over budget: park the task (retried later) or
    # fail it.
    on_exhausted: OnExhausted = "park"
    # A model that failed a call (429, 5xx, timeout) is skipped this long.
    cooldown: PositiveDuration = 30.0

    @field_validator("data_class")
    @classmethod
    def _boundary(cls, value: str) -> str:
        return check_boundary(value)

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        seen: set[str] = set()
        for index, model in enumerate(self.models):
            if model in seen:
                raise _error(f'"{model}" is listed twice', "models", index)
            seen.add(model)
        return self


class AgentPlacement(_Model):
    """``spec.placement``: which daemons may host the agent (their labels must match)."""

    daemons: dict[str, str] = Field(default_factory=dict)

    @field_validator("daemons")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value, "daemons")


class Evaluate(_Model):
    """``spec.evaluate``: a function of the task and its result that returns its verdict."""

    entrypoint: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
    timeout: PositiveDuration = 30.0


class ModelPrices(_Model):
    """Prices per 1,000 tokens (any currency, the same for every model of a fleet)."""

    input: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    cached_input: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # None: input
    output: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class FleetPrices(_Model):
    """The fleet's prices that are not a Model's: agent-hours, KV storage, and the token
    prices of the daemons' own engine (``default``, which has no Model)."""

    # The daemon's own engine (spec.model: default) has no Model to carry prices.
    default_model: ModelPrices | None = None

    per_agent_hour: float = Field(default=0.0, ge=0, allow_inf_nan=False, strict=True)
    per_gb_hour_kv: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, strict=True, alias="perGBHourKV"
    )
