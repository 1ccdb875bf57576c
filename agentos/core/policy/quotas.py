"""What the quota policy evaluator reads and writes: limits, class quotas, rule memory.

These records cross from the evaluator (one daemon, under a lease) through Redis to
every daemon's admission and to ``agentos policy explain``, so each has a ``to_json`` /
``from_json`` pair with the spec's camelCase keys. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agentos.core.spec.quota import QuotaLimits

__all__ = ["Change", "ClassQuota", "Evaluation", "Limits", "RuleMemory", "RuleStatus"]

# (field name, key in YAML and JSON), in the spec's order.
_FIELDS: Final[tuple[tuple[str, str], ...]] = tuple(
    (name, field.alias or name) for name, field in QuotaLimits.model_fields.items()
)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Limits:
    """A set of quota limits in force; ``None`` is unlimited."""

    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    daily_agent_seconds: int | None = None

    @classmethod
    def from_spec(cls, spec: QuotaLimits | None) -> Limits:
        """Return the limits declared by ``spec`` (all unlimited for ``None``)."""
        if spec is None:
            return cls()
        return cls(**{name: getattr(spec, name) for name, _ in _FIELDS})

    def to_json(self) -> dict[str, int]:
        """Return the limits with the spec's camelCase keys, unlimited ones left out."""
        return {key: value for name, key in _FIELDS if (value := getattr(self, name)) is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        """Return the limits of :meth:`to_json` output; unknown keys are ignored."""
        return cls(**{name: _optional_int(data.get(key)) for name, key in _FIELDS})

    def describe(self) -> str:
        """Return e.g. ``"tokensPerMinute=5000 maxConcurrent=1"``, or ``"unlimited"``."""
        return " ".join(f"{key}={value}" for key, value in self.to_json().items()) or "unlimited"


@dataclass(frozen=True, slots=True)
class ClassQuota:
    """A quota class's limits in force now, what was declared, and the rules behind it.

    ``limits`` are shared by all agents of the class, ``per_agent`` apply to each agent
    on its own. ``rules`` describes the rules in effect, e.g.
    ``("shed-batch-under-pressure x2 (scale 0.25)",)``.
    """

    name: str
    policy: str
    timezone: str
    limits: Limits
    per_agent: Limits
    base: Limits
    base_per_agent: Limits
    rules: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return plain JSON data that :meth:`from_json` turns back into an equal quota."""
        return {
            "name": self.name,
            "policy": self.policy,
            "timezone": self.timezone,
            "limits": self.limits.to_json(),
            "perAgent": self.per_agent.to_json(),
            "base": self.base.to_json(),
            "basePerAgent": self.base_per_agent.to_json(),
            "rules": list(self.rules),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassQuota:
        """Return the quota of :meth:`to_json` output.

        Raises:
            KeyError: if ``name``, ``policy`` or ``timezone`` is missing.
        """
        return cls(
            name=str(data["name"]),
            policy=str(data["policy"]),
            timezone=str(data["timezone"]),
            limits=Limits.from_json(data.get("limits", {})),
            per_agent=Limits.from_json(data.get("perAgent", {})),
            base=Limits.from_json(data.get("base", {})),
            base_per_agent=Limits.from_json(data.get("basePerAgent", {})),
            rules=tuple(str(reason) for reason in data.get("rules", ())),
        )


@dataclass(frozen=True, slots=True)
class RuleMemory:
    """What the evaluator remembers about one rule between evaluations.

    ``since``: when the condition started to hold without a break (``None`` while it does
    not hold). ``clear_since``: when it stopped holding while the rule is in effect.
    ``steps``: how many times the rule's effect is applied now (0: not in effect).
    ``changed_at``: when ``steps`` last changed (the start of the cooldown).
    """

    since: float | None = None
    clear_since: float | None = None
    steps: int = 0
    changed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return plain JSON data (unset times left out) for :meth:`from_json`."""
        data: dict[str, Any] = {"steps": self.steps}
        for key, value in (
            ("since", self.since),
            ("clearSince", self.clear_since),
            ("changedAt", self.changed_at),
        ):
            if value is not None:
                data[key] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuleMemory:
        """Return the memory of :meth:`to_json` output; missing keys take their defaults."""
        return cls(
            since=_optional_float(data.get("since")),
            clear_since=_optional_float(data.get("clearSince")),
            steps=int(data.get("steps", 0)),
            changed_at=_optional_float(data.get("changedAt")),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One rescale made by a rule, to be recorded as an event.

    ``action`` is ``"rescaled"`` (a step applied) or ``"restored"`` (the rule's steps
    undone). ``before`` / ``after`` are the class-level limits; ``reason`` is a sentence
    with the metric's value, the threshold, how long, and every limit that changed.
    """

    policy: str
    rule: str
    class_: str
    action: str
    before: Limits
    after: Limits
    reason: str


@dataclass(frozen=True, slots=True)
class RuleStatus:
    """Where one rule stands after an evaluation (a line of ``agentos policy explain``).

    ``state`` is ``"idle"`` (not in effect and not about to be), ``"pending"`` (the
    condition holds, waiting for ``for``), ``"active"`` (in effect, nothing blocks it),
    ``"cooling"`` (the cooldown blocks its next step) or ``"recovering"`` (the condition
    stopped holding; the stabilization window runs). ``wait_s`` is what is left of the
    for / cooldown / stabilization that blocks the next change. ``next`` is what the
    class's limits would be after this rule's next change (``None``: it would change
    nothing).
    """

    policy: str
    rule: str
    class_: str
    metric: str | None
    value: float | None
    condition: str
    holds: bool
    held_for_s: float
    steps: int
    state: str
    wait_s: float
    current: Limits
    next: Limits | None
    message: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The result of :func:`evaluate`.

    ``memory`` is keyed ``"<policy>/<rule>"`` and replaces the memory passed in.
    """

    quotas: dict[str, ClassQuota]
    memory: dict[str, RuleMemory]
    changes: tuple[Change, ...]
    rules: tuple[RuleStatus, ...]
