"""The declarative resources (Agent, QuotaPolicy, Model, ToolServer): schema and loading.

Operators describe agents and quota policies in YAML; ``agentos apply`` must validate a
whole set of files before it changes anything and, when something is wrong, name every
problem with its file, line and field. This module owns that contract: the pydantic
models are the schema (also exported as JSON Schema for editors), and the loaders turn
YAML text into validated resources or one :class:`SpecError` listing all issues.

It is a pure core: no I/O besides reading the files it is asked to read, and no imports
of the async or storage layers.
"""

import dataclasses
import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, time
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self, TypeAlias, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import ErrorDetails

from agentos.core.durations import Duration, PositiveDuration, format_duration
from agentos.core.errors import DEFAULT_MAX_MESSAGE_BYTES
from agentos.core.limits import TaskLimits
from agentos.core.modelspec import ModelResource
from agentos.core.routespec import AgentPlacement, Evaluate, FleetPrices, Route
from agentos.core.specbase import (
    _ERROR_TYPE,
    _ISSUES_KEY,
    API_VERSION,
    NAME_PATTERN,
    Metadata,
    Name,
    _error,
    _errors,
    _Model,
    _render_path,
    _show,
    _SubPath,
)
from agentos.core.toolserver import AgentTools, ToolServerResource

__all__ = [
    "API_VERSION",
    "KINDS",
    "MAX_EXPANDED_NODES",
    "METRICS",
    "NAME_PATTERN",
    "TRIGGER_KINDS",
    "AgentResource",
    "AgentSpec",
    "AnyResource",
    "Backoff",
    "CatchUp",
    "ClassLimits",
    "ContextPolicy",
    "Document",
    "Hibernation",
    "Inbox",
    "KeepKV",
    "Metadata",
    "Metric",
    "ModelResource",
    "OnOverflow",
    "Overlap",
    "QuotaClass",
    "QuotaLimits",
    "QuotaPolicyResource",
    "QuotaPolicySpec",
    "Resource",
    "RestartPolicy",
    "Rule",
    "RuleThen",
    "RuleWhen",
    "SpecError",
    "SpecIssue",
    "Trigger",
    "TriggerKind",
    "Weekday",
    "canonical",
    "inbox_limit",
    "json_schema",
    "load_paths",
    "parse_resource",
    "parse_text",
]

_ENTRYPOINT_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
)
_HOURS_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f'unknown time zone {_show(value)} (expected an IANA name such as "UTC" or '
            '"Europe/Paris")'
        ) from None
    return value


TimeZoneName = Annotated[
    str,
    AfterValidator(_check_timezone),
    WithJsonSchema({"type": "string", "description": 'IANA time zone, e.g. "UTC".'}),
]


def _check_cron(value: str) -> str:
    if not value.strip() or not croniter.is_valid(value):
        raise ValueError(
            f"invalid cron expression {_show(value)} (expected 5 fields: minute hour "
            'day-of-month month day-of-week, e.g. "*/15 * * * *")'
        )
    return value


CronExpression = Annotated[
    str,
    AfterValidator(_check_cron),
    WithJsonSchema({"type": "string", "description": 'Cron expression, e.g. "*/15 * * * *".'}),
]


def _check_entrypoint(value: str) -> str:
    if not _ENTRYPOINT_RE.fullmatch(value):
        raise ValueError(
            'expected an import path like "package.module:ClassName"; got ' + _show(value)
        )
    return value


Entrypoint = Annotated[
    str,
    AfterValidator(_check_entrypoint),
    WithJsonSchema({"type": "string", "pattern": f"^{_ENTRYPOINT_RE.pattern}$"}),
]


def _check_aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            'expected a date and time with a time zone, like "2026-12-01T09:00:00Z" '
            '(add "Z" or an offset such as "+02:00")'
        )
    return value


AwareDateTime = Annotated[datetime, AfterValidator(_check_aware)]

Metric = Literal[
    "queue_wait_p95_s", "slot_utilisation", "budget_burn_rate", "error_rate", "throttle_rate"
]
METRICS: Final[tuple[Metric, ...]] = get_args(Metric)
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
CatchUp = Literal["skip", "one", "all"]
Overlap = Literal["skip", "queue", "cancelPrevious"]
KeepKV = Literal["auto", "always", "never"]
TriggerKind = Literal["schedule", "heartbeat", "every", "at", "inbox"]
TRIGGER_KINDS: Final[tuple[TriggerKind, ...]] = get_args(TriggerKind)

# Options that only mean something for triggers that recur on a clock.
_CLOCK_TRIGGERS: Final = ("schedule", "every")
_CLOCK_OPTIONS: Final = ("timezone", "catch_up", "overlap")
_CLOCK_OPTION_KEYS: Final = frozenset({"timezone", "catchUp", "catch_up", "overlap"})


# ---------------------------------------------------------------------------- the models


INBOX_MAX_DEPTH: Final = 10_000
"""How many messages an inbox holds when its trigger sets no ``maxDepth``."""


class Inbox(_Model):
    """Options of an ``inbox`` trigger (messages delivered through a Redis stream).

    ``maxDepth`` bounds the messages waiting (sent and not yet done): a send beyond it
    is refused (``InboxFull``), so a stuck agent's inbox cannot fill Redis. Left out of
    the canonical form unless given (None: :data:`INBOX_MAX_DEPTH`), so existing specs
    keep their hash.
    """

    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0, strict=True)
    max_depth: int | None = Field(default=None, ge=1, strict=True)

    @property
    def depth_limit(self) -> int:
        """The most messages the inbox holds: ``maxDepth``, or the default."""
        return INBOX_MAX_DEPTH if self.max_depth is None else self.max_depth


class Trigger(_Model):
    """One way an agent is woken. Exactly one of the five kind fields is set; see ``kind``.

    ``timezone``, ``catchUp`` and ``overlap`` apply to ``schedule`` and ``every`` triggers
    only (giving them on another kind is an error); on other kinds they keep their
    defaults and are left out when the trigger is written back. ``at`` must carry a time
    zone ("Z" or an offset); a naive time is an error rather than a guess.
    """

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": [kind]} for kind in TRIGGER_KINDS]}
    )

    schedule: CronExpression | None = None
    heartbeat: PositiveDuration | None = None
    every: PositiveDuration | None = None
    at: AwareDateTime | None = None
    inbox: Inbox | None = None
    timezone: TimeZoneName = "UTC"
    catch_up: CatchUp = "one"
    overlap: Overlap = "skip"

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_kind(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        kinds = [kind for kind in TRIGGER_KINDS if kind in data]
        allowed = ", ".join(TRIGGER_KINDS)
        if not kinds:
            others = [str(key) for key in data]
            hint = ""
            for key in others:
                close = difflib.get_close_matches(key, TRIGGER_KINDS, n=1)
                if close:
                    hint = f'; did you mean "{close[0]}"?'
                    break
            got = f" (got: {', '.join(others)})" if others else ""
            raise _error(f"a trigger needs one of: {allowed}{got}{hint}")
        if len(kinds) > 1:
            raise _error(
                f"a trigger takes exactly one of: {allowed}; got {', '.join(kinds)} "
                "(write each as its own list item)"
            )
        kind = kinds[0]
        if kind not in _CLOCK_TRIGGERS:
            misplaced = [key for key in data if key in _CLOCK_OPTION_KEYS]
            if misplaced:
                raise _errors(
                    [
                        ((key,), f"only schedule and every triggers take {key}, not {kind}")
                        for key in misplaced
                    ]
                )
        if kind == "inbox" and data["inbox"] is None:
            # `- inbox:` with nothing after it reads as null in YAML; it means "defaults".
            return {**data, "inbox": {}}
        return data

    @property
    def kind(self) -> TriggerKind:
        """Which kind of trigger this is: the name of the one kind field that is set."""
        for kind in TRIGGER_KINDS:
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a validated Trigger always has a kind")  # pragma: no cover

    @model_serializer(mode="wrap")
    def _serialize_set_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Write only what belongs to this kind, so that the output validates again
        # (clock options on a heartbeat would be rejected) and reads like the input.
        data: dict[str, Any] = handler(self)
        keep: set[str] = {self.kind}
        if self.kind in _CLOCK_TRIGGERS:
            keep.update(_CLOCK_OPTIONS)
        fields = type(self).model_fields
        keys = keep | {fields[name].alias or name for name in keep}
        return {key: value for key, value in data.items() if key in keys}


class Hibernation(_Model):
    """When an idle agent is swapped out, and whether its KV cache is kept.

    An agent idle for ``idleAfter`` hibernates and is released: no daemon holds it until
    its next trigger. ``idleAfter: 0`` (or ``hibernation: never``) keeps it active.
    """

    idle_after: Duration = 60.0
    keep_kv: KeepKV = Field(default="auto", alias="keepKV")

    @model_validator(mode="before")
    @classmethod
    def _never(cls, data: object) -> object:
        return {"idleAfter": 0.0} if data == "never" else data

    @property
    def never(self) -> bool:
        """The agent never hibernates for being idle (it stays active)."""
        return self.idle_after <= 0


OnOverflow = Literal["compact", "fail"]


class ContextPolicy(_Model):
    """What happens to an agent's conversation when it no longer fits the model.

    ``onOverflow: compact`` (the default) drops the oldest turns, keeps the system
    message(s) and every tool call with its result, and sends the rest again; ``fail``
    raises ``ContextOverflow`` to the agent's code, as a call always did before.
    """

    on_overflow: OnOverflow = "compact"


class Backoff(_Model):
    """Exponential restart delay: starts at ``initial`` seconds, capped at ``max``."""

    initial: PositiveDuration = 1.0
    max: PositiveDuration = 300.0

    @model_validator(mode="after")
    def _initial_not_above_max(self) -> Self:
        if self.initial > self.max:
            raise _error(
                f"initial ({format_duration(self.initial)}) must not be longer than max "
                f"({format_duration(self.max)})",
                "initial",
            )
        return self


class RestartPolicy(_Model):
    """How a crashed agent is restarted, and after how many crashes it is crash-looping."""

    backoff: Backoff = Field(default_factory=Backoff)
    crash_loop_after: int = Field(default=5, ge=1, strict=True)


class AgentSpec(_Model):
    """The desired state of one agent."""

    entrypoint: Entrypoint
    model: str = Field(default="default", min_length=1)
    # Whether calls may go to the Model's fallback while it is down (None: yes). Left out
    # of the canonical form unless given, so existing specs keep their hash.
    model_fallback: bool | None = None
    triggers: tuple[Trigger, ...] = ()
    hibernation: Hibernation = Field(default_factory=Hibernation)
    quota_class: Name = "standard"
    priority: int = Field(default=50, ge=0, le=1000, strict=True)
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy)
    config: dict[str, Any] = Field(default_factory=dict)
    # Left out of the canonical form unless given (None: compact), so existing specs
    # keep their hash.
    context: ContextPolicy | None = None
    # The ToolServers the agent may use and its own approvals (None: none).
    tools: AgentTools | None = None
    # Limits on each task (None: none): taskTimeout, maxSteps, maxTokensPerTask.
    limits: TaskLimits | None = None
    # Where the entrypoint's module is imported from (relative to the spec file); `apply`
    # stores it absolute, with codeHash, a hash of the module file (see core.code).
    code_path: str | None = Field(default=None, min_length=1)
    code_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    # The long form of ``model``: candidates and how a call picks one (an agent has one
    # or the other). Left out of the canonical form unless given, like the two below.
    route: Route | None = None
    # Which daemons may host the agent: a node selector over their labels.
    placement: AgentPlacement | None = None
    # A function that judges each task (pass, fail or a score) after it ran.
    evaluate: Evaluate | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_or_route(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "route" in data and "model" in data:
            raise _error(
                "an agent has spec.model or spec.route, not both (route.models lists the "
                "candidates)",
                "route",
            )
        return data

    @model_serializer(mode="wrap")
    def _serialize_model_or_route(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.route is not None:
            data.pop("model", None)
        return data

    @property
    def models(self) -> tuple[str, ...]:
        """The models the agent's calls may go to: the route's candidates, or its model."""
        return self.route.models if self.route is not None else (self.model,)

    @property
    def route_key(self) -> str:
        """How ``usage --by route`` names the agent's route: ``STRATEGY:M1,M2`` for a
        route, the model's name for an agent with one model."""
        if self.route is None:
            return self.model
        return f"{self.route.strategy}:{','.join(self.route.models)}"

    @property
    def on_overflow(self) -> OnOverflow:
        """What a call does when the conversation does not fit: compact or fail."""
        return "compact" if self.context is None else self.context.on_overflow


class AgentResource(_Model):
    """``kind: Agent``."""

    api_version: Literal["agentos/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["Agent"] = "Agent"
    metadata: Metadata
    spec: AgentSpec


class QuotaLimits(_Model):
    """Limits of a quota class; a limit left out (``None``) is unlimited."""

    tokens_per_minute: int | None = Field(default=None, gt=0, strict=True)
    max_concurrent: int | None = Field(default=None, gt=0, strict=True)
    daily_tokens: int | None = Field(default=None, gt=0, strict=True)
    daily_agent_seconds: int | None = Field(default=None, gt=0, strict=True)


class ClassLimits(QuotaLimits):
    """Limits of a quota class.

    The class-level limits are shared by all agents of the class together; ``perAgent``
    limits apply to each agent of the class on its own (so one busy agent cannot take
    the whole class's share).
    """

    per_agent: QuotaLimits | None = Field(default=None, alias="perAgent")
    # Money the class may spend per day (in the Models' price unit), enforced before each
    # call on its projected cost.
    daily_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)


QuotaClass = ClassLimits
"""A quota class is a named set of limits (shared, and optionally per agent)."""


class RuleWhen(_Model):
    """The condition of a rule: a metric threshold, a time window, or both."""

    metric: Metric | None = None
    above: float | None = Field(default=None, allow_inf_nan=False)
    below: float | None = Field(default=None, allow_inf_nan=False)
    for_: Duration = Field(default=0.0, alias="for")
    hours: str | None = None
    weekdays: tuple[Weekday, ...] | None = Field(default=None, min_length=1)

    @field_validator("hours")
    @classmethod
    def _valid_hours(cls, value: str | None) -> str | None:
        if value is not None:
            match = _HOURS_RE.fullmatch(value)
            if not match:
                raise ValueError(f'expected a time window like "09:00-18:00"; got {_show(value)}')
            if value[:5] == value[6:]:
                raise ValueError(f"the time window {_show(value)} is empty (start equals end)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.metric is None:
            orphans = [
                ((key,), "only makes sense with a metric")
                for key, value in (("above", self.above), ("below", self.below))
                if value is not None
            ]
            if self.for_ > 0:
                orphans.append((("for",), "only makes sense with a metric"))
            if orphans:
                raise _errors(orphans)
            if self.hours is None and self.weekdays is None:
                raise _error(
                    "needs a metric (with above or below) and/or a time window (hours, weekdays)"
                )
        elif (self.above is None) == (self.below is None):
            raise _error(f"metric {self.metric} needs exactly one of: above, below")
        return self

    @property
    def hours_window(self) -> tuple[time, time] | None:
        """The ``hours`` window as (start, end) local times; end < start wraps midnight."""
        if self.hours is None:
            return None
        start, end = self.hours.split("-")
        return time.fromisoformat(start), time.fromisoformat(end)


class RuleThen(_Model):
    """The effect of a rule on one quota class: scale it or set limits, then clamp."""

    class_: Name = Field(alias="class")
    scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    set: QuotaLimits | None = None
    min: QuotaLimits | None = None
    max: QuotaLimits | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        issues: list[tuple[_SubPath, str]] = []
        if (self.scale is None) == (self.set is None):
            issues.append(((), "needs exactly one of: scale, set"))
        if self.min is not None and self.max is not None:
            for name, field in QuotaLimits.model_fields.items():
                low, high = getattr(self.min, name), getattr(self.max, name)
                if low is not None and high is not None and low > high:
                    key = field.alias or name
                    issues.append((("min", key), f"min ({low}) is greater than max ({high})"))
        if issues:
            raise _errors(issues)
        return self


class Rule(_Model):
    """A dynamic rescaling rule of a quota policy."""

    name: Name
    when: RuleWhen
    then: RuleThen
    cooldown: Duration = 0.0
    stabilization: Duration = 0.0


class QuotaPolicySpec(_Model):
    """Quota classes and the rules that rescale them while the fleet runs."""

    timezone: TimeZoneName = "UTC"
    classes: dict[Name, ClassLimits] = Field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # The fleet's prices per agent-hour and per GB-hour of KV (token prices are on each
    # Model); at most one applied policy declares them.
    prices: FleetPrices | None = None

    @model_validator(mode="after")
    def _rules_fit_classes(self) -> Self:
        issues: list[tuple[_SubPath, str]] = []
        first: dict[str, int] = {}
        known = ", ".join(sorted(self.classes)) or "none are defined"
        for index, rule in enumerate(self.rules):
            if rule.name in first:
                issues.append(
                    (
                        ("rules", index, "name"),
                        f'duplicate rule name "{rule.name}" '
                        f"(first used by rules[{first[rule.name]}])",
                    )
                )
            else:
                first[rule.name] = index
            if rule.then.class_ not in self.classes:
                issues.append(
                    (
                        ("rules", index, "then", "class"),
                        f'unknown class "{rule.then.class_}" (expected one of the classes '
                        f"of this policy: {known})",
                    )
                )
        issues.extend(_overlapping_rules(self.rules))
        if issues:
            raise _errors(issues)
        return self


# The limits each kind of effect changes: a scale moves the load limits only (daily
# budgets are money, not load), a set changes exactly what it gives.
_SCALED_FIELDS: Final = ("tokens_per_minute", "max_concurrent")


def _touched_fields(then: RuleThen) -> tuple[str, ...]:
    if then.set is None:
        return _SCALED_FIELDS
    return tuple(name for name in QuotaLimits.model_fields if getattr(then.set, name) is not None)


def _minute_ranges(window: tuple[time, time]) -> list[tuple[int, int]]:
    """Return an hours window as half-open minute-of-day ranges (two if it wraps)."""
    start, end = (moment.hour * 60 + moment.minute for moment in window)
    return [(start, end)] if start < end else [(start, 24 * 60), (0, end)]


def _exclusive(first: RuleWhen, second: RuleWhen) -> bool:
    """Whether the two conditions provably never hold at the same time."""
    if (
        first.weekdays is not None
        and second.weekdays is not None
        and not set(first.weekdays) & set(second.weekdays)
    ):
        return True
    if first.hours_window is not None and second.hours_window is not None:
        others = _minute_ranges(second.hours_window)
        if not any(
            start < other_end and other_start < end
            for start, end in _minute_ranges(first.hours_window)
            for other_start, other_end in others
        ):
            return True
    if first.metric is not None and first.metric == second.metric:
        # "value > a" and "value < b" cannot both be true when b <= a.
        for high, low in ((first, second), (second, first)):
            if high.above is not None and low.below is not None and low.below <= high.above:
                return True
    return False


def _overlapping_rules(rules: Sequence[Rule]) -> list[tuple[_SubPath, str]]:
    # Two rules moving the same limit of one class at the same time would fight, and
    # which one wins would depend on their order in the list.
    issues: list[tuple[_SubPath, str]] = []
    for index, rule in enumerate(rules):
        touched = _touched_fields(rule.then)
        for earlier_index, earlier in enumerate(rules[:index]):
            if earlier.then.class_ != rule.then.class_ or _exclusive(earlier.when, rule.when):
                continue
            common = [name for name in _touched_fields(earlier.then) if name in touched]
            if not common:
                continue
            keys = " and ".join(QuotaLimits.model_fields[name].alias or name for name in common)
            verb = "scales" if rule.then.set is None else "sets"
            issues.append(
                (
                    ("rules", index, "then"),
                    f'{verb} {keys} of class "{rule.then.class_}" like rules[{earlier_index}] '
                    f'("{earlier.name}") and their conditions can hold at the same time; '
                    "give them disjoint hours/weekdays or merge them",
                )
            )
            break
    return issues


class QuotaPolicyResource(_Model):
    """``kind: QuotaPolicy``."""

    api_version: Literal["agentos/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["QuotaPolicy"] = "QuotaPolicy"
    metadata: Metadata
    spec: QuotaPolicySpec


AnyResource: TypeAlias = AgentResource | QuotaPolicyResource | ModelResource | ToolServerResource

Resource = Annotated[AnyResource, Field(discriminator="kind")]
"""Any resource, told apart by ``kind``."""

_MODELS: Final[dict[str, type[AnyResource]]] = {
    "Agent": AgentResource,
    "QuotaPolicy": QuotaPolicyResource,
    "Model": ModelResource,
    "ToolServer": ToolServerResource,
}
KINDS: Final[tuple[str, ...]] = tuple(_MODELS)


def canonical(resource: AnyResource) -> dict[str, Any]:
    """Return the resource as plain JSON-compatible data with YAML key names.

    The form is stable (every default written out, durations as strings, unset limits
    left out) and :func:`parse_resource` on it gives an equal resource, so it is what
    gets stored and compared.
    """
    return resource.model_dump(mode="json", by_alias=True, exclude_none=True)


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of a resource document, for editor completion."""
    schema = TypeAdapter(Resource).json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "agentos resource",
        **schema,
    }


# ------------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class SpecIssue:
    """One problem found while loading specs.

    ``line`` is 1-based; 0 means the problem has no line (a missing path, data that did
    not come from a file). ``path`` uses YAML key names, e.g. ``spec.triggers[0].schedule``;
    empty when the problem is with the file or document as a whole.
    """

    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line > 0 else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """Specs failed to load; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues: list[SpecIssue] = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


@dataclasses.dataclass(frozen=True)
class Document:
    """A validated resource and where it was read from (``line``: 1-based document start)."""

    resource: AnyResource
    source: str
    line: int
    lines: Mapping[tuple[str | int, ...], int] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )  # YAML path -> line, for errors found after loading (see line_of)

    @property
    def kind(self) -> str:
        """The resource kind: ``"Agent"`` or ``"QuotaPolicy"``."""
        return self.resource.kind

    @property
    def name(self) -> str:
        """The resource name (``metadata.name``)."""
        return self.resource.metadata.name

    def line_of(self, *path: str | int) -> int:
        """The line of the YAML node at ``path`` (YAML key names), else of the nearest
        parent that has one, else the document's."""
        return _line_for(path, dict(self.lines), self.line)

    def canonical(self) -> dict[str, Any]:
        """Return :func:`canonical` of the resource."""
        return canonical(self.resource)


_Lines: TypeAlias = dict[tuple[str | int, ...], int]


@dataclasses.dataclass
class _Loaded:
    """Accumulates documents and issues across every file of one load."""

    documents: list[tuple[Document, int]] = dataclasses.field(default_factory=list)
    issues: list[SpecIssue] = dataclasses.field(default_factory=list)

    def result(self) -> list[Document]:
        seen: dict[tuple[str, str], Document] = {}
        for document, name_line in self.documents:
            key = (document.kind, document.name)
            first = seen.get(key)
            if first is None:
                seen[key] = document
                continue
            self.issues.append(
                SpecIssue(
                    document.source,
                    name_line,
                    "metadata.name",
                    f'duplicate {document.kind} "{document.name}" (first defined at '
                    f"{first.source}:{first.line})",
                )
            )
        if self.issues:
            order: dict[str, int] = {}
            for issue in self.issues:
                order.setdefault(issue.source, len(order))
            raise SpecError(sorted(self.issues, key=lambda i: (order[i.source], i.line)))
        return [document for document, _ in self.documents]


def _index_lines(
    node: yaml.Node,
    path: tuple[str | int, ...],
    lines: _Lines,
    issues: list[SpecIssue],
    source: str,
    active: frozenset[int] = frozenset(),
) -> None:
    # A key maps to the line of the key itself (where a reader looks for the field), a
    # list item to the line where the item starts.
    if id(node) in active:  # a recursive alias; its lines are already known
        return
    active = active | {id(node)}
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            child = (*path, key)
            if key in first_line:
                # PyYAML silently keeps the last one; a repeated key is nearly always a
                # paste error that would drop half a spec without anyone noticing.
                issues.append(
                    SpecIssue(
                        source,
                        line,
                        _render_path(child),
                        f"duplicate key (first at line {first_line[key]})",
                    )
                )
                continue
            first_line[key] = line
            lines[child] = line
            _index_lines(value_node, child, lines, issues, source, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), lines, issues, source, active)


MAX_EXPANDED_NODES = 10_000
"""How many YAML nodes aliases may make a document stand for (more if it is written larger).

PyYAML composes an alias as a second reference to the anchored node, so a few hundred
bytes of anchors of anchors (the "billion laughs") stand for billions of nodes, which
the line index and validation would each walk: ``apply`` hung. A real spec is a few
hundred nodes; one that needs more can write them out.
"""


def _node_counts(root: yaml.Node) -> tuple[int, int]:
    """``(written, expanded)``: distinct nodes of ``root``'s graph, and how many it stands
    for once every alias is expanded (a recursive alias counts once, as it is indexed)."""
    expanded: dict[int, int] = {}

    def walk(node: yaml.Node, active: frozenset[int]) -> int:
        key = id(node)
        if key in active:
            return 1
        if key not in expanded:
            inner = active | {key}
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            expanded[key] = 1 + sum(walk(child, inner) for child in children)
        return expanded[key]

    total = walk(root, frozenset())
    return len(expanded), total


# libyaml's parser when PyYAML was built with it (about ten times faster: an apply of
# 100,000 agents is mostly YAML parsing), the pure-Python one otherwise.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(text: str, source: str, loaded: _Loaded) -> None:
    loader = _SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node() said there is one
                continue
            written, expanded = _node_counts(node)
            if expanded > max(MAX_EXPANDED_NODES, written):
                loaded.issues.append(
                    SpecIssue(
                        source,
                        node.start_mark.line + 1,
                        "",
                        f"aliases expand this document to {expanded:,} YAML nodes (at most "
                        f"{MAX_EXPANDED_NODES:,}, or as many as are written: {written:,}); "
                        "write the repeated parts out or use fewer aliases",
                    )
                )
                continue
            lines: _Lines = {}
            _index_lines(node, (), lines, loaded.issues, source)
            data = loader.construct_document(node)
            if data is None:
                continue
            _validate_document(data, source, node.start_mark.line + 1, lines, loaded)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        # libyaml puts an error at the end of the stream on the line after the last one.
        line = min(mark.line + 1, text.count("\n") + 1) if mark else 0
        loaded.issues.append(SpecIssue(source, line, "", f"invalid YAML: {what}"))
    except yaml.YAMLError as exc:
        loaded.issues.append(SpecIssue(source, 0, "", f"invalid YAML: {exc}"))
    finally:
        loader.dispose()


def _validate_document(data: Any, source: str, line: int, lines: _Lines, loaded: _Loaded) -> None:
    resource, issues = _validate(data, source, line, lines)
    loaded.issues.extend(issues)
    if resource is not None:
        loaded.documents.append(
            (
                Document(resource, source, line, dict(lines)),
                _line_for(("metadata", "name"), lines, line),
            )
        )


def _validate(
    data: Any, source: str, line: int, lines: _Lines
) -> tuple[AnyResource | None, list[SpecIssue]]:
    def issue(path: Sequence[str | int], message: str) -> SpecIssue:
        return SpecIssue(source, _line_for(path, lines, line), _render_path(path), message)

    if not isinstance(data, Mapping):
        return None, [
            issue(
                (),
                f"expected a mapping with apiVersion, kind, metadata and spec; got {_show(data)}",
            )
        ]
    issues: list[SpecIssue] = []
    if "apiVersion" not in data:
        issues.append(issue(("apiVersion",), f'missing (expected "{API_VERSION}")'))
    elif data["apiVersion"] != API_VERSION:
        issues.append(
            issue(
                ("apiVersion",),
                f'unsupported apiVersion {_show(data["apiVersion"])} (expected "{API_VERSION}")',
            )
        )
    kinds = ", ".join(KINDS)
    kind = data.get("kind")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        if "kind" not in data:
            issues.append(issue(("kind",), f"missing (expected one of: {kinds})"))
        else:
            issues.append(
                issue(("kind",), f"unknown kind {_show(kind)} (expected one of: {kinds})")
            )
        return None, issues

    # apiVersion is already checked above with a better message; validating the rest
    # anyway means one run reports everything that is wrong with the document.
    payload = {**data, "apiVersion": API_VERSION}
    try:
        resource = model.model_validate(payload)
    except ValidationError as exc:
        for error in exc.errors():
            for path, message in _explain(error, model):
                issues.append(issue(path, message))
        return None, issues
    return (None if issues else resource), issues


def _line_for(path: Sequence[str | int], lines: _Lines, default: int) -> int:
    """Return the line of the deepest YAML node that exists along ``path``."""
    parts = tuple(part for part in path if part != "[key]")
    for end in range(len(parts), -1, -1):
        found = lines.get(parts[:end])
        if found is not None:
            return found
    return default


def _explain(error: ErrorDetails, root: type[BaseModel]) -> list[tuple[_SubPath, str]]:
    """Turn one pydantic error into (path, message) pairs that say what was expected."""
    loc: _SubPath = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == _ERROR_TYPE:
        return [((*loc, *sub), text) for sub, text in ctx[_ISSUES_KEY]]
    message = error["msg"]
    value = error.get("input")
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        if model is None:
            return [(loc, "unknown field")]
        expected = [field.alias or name for name, field in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), expected, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        return [(loc, f"unknown field (expected one of: {', '.join(expected)}){hint}")]
    if kind == "missing":
        return [(loc, "required field is missing")]
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return [(loc, f"expected one of: {choices}; got {_show(value)}")]
    for noise in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(noise)
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
        if message.startswith(("expected greater", "expected less")):
            message = message.replace("expected ", "expected a value ", 1)
        message = message.replace("a valid dictionary", "a mapping")
        if value is None or isinstance(value, str | int | float | bool | list | tuple | dict):
            message += f"; got {_show(value)}"
    return [(loc, message)]


def _strip_optional(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            args = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(root: type[BaseModel], loc: _SubPath) -> type[BaseModel] | None:
    """Return the model class that validates the value at ``loc``, if there is one."""
    current: Any = root
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            for name, field in current.model_fields.items():
                if part in (name, field.alias):
                    current = field.annotation
                    break
            else:
                return None
        elif get_origin(current) in (list, tuple) and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict and isinstance(part, str):
            current = get_args(current)[1]
        else:
            return None
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def parse_text(text: str, source: str = "<stdin>") -> list[Document]:
    """Return the validated resources in ``text``, a (multi-document) YAML string.

    Empty documents are skipped. ``source`` names the text in issues.

    Raises:
        SpecError: listing every problem found (nothing is returned partially).
    """
    loaded = _Loaded()
    _read_yaml(text, source, loaded)
    return loaded.result()


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def load_paths(paths: Iterable[str | Path]) -> list[Document]:
    """Return the validated resources in the given files and directories, in order.

    A directory contributes every ``*.yaml`` / ``*.yml`` file below it, recursively, in
    sorted order, skipping hidden files and directories (names starting with "."). A file
    reached twice is read once. Documents of the same kind may not share a name.

    Raises:
        SpecError: listing every problem in every file (nothing is returned partially),
            including paths that do not exist and directories without YAML files.
    """
    loaded = _Loaded()
    read: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(
                candidate
                for candidate in path.rglob("*")
                if candidate.suffix in (".yaml", ".yml")
                and candidate.is_file()
                and not _is_hidden(candidate, path)
            )
            if not files:
                loaded.issues.append(
                    SpecIssue(str(path), 0, "", "directory contains no .yaml or .yml files")
                )
        elif path.exists():
            files = [path]
        else:
            loaded.issues.append(SpecIssue(str(path), 0, "", "no such file or directory"))
            continue
        for file in files:
            identity = file.resolve()
            if identity in read:
                continue
            read.add(identity)
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                loaded.issues.append(SpecIssue(str(file), 0, "", f"cannot read: {exc}"))
                continue
            _read_yaml(text, str(file), loaded)
    return loaded.result()


def parse_resource(data: Mapping[str, Any]) -> AnyResource:
    """Return the resource described by ``data`` (e.g. :func:`canonical` output read back).

    Raises:
        SpecError: listing every problem, with source ``"<data>"`` and no line numbers.
    """
    resource, issues = _validate(data, "<data>", 0, {})
    if resource is None:
        raise SpecError(issues)
    return resource


def inbox_limit(agent: AgentResource) -> int:
    """The largest message, in bytes, the agent's inbox accepts (its first ``inbox``
    trigger's ``maxMessageBytes``; the default when it declares none)."""
    for trigger in agent.spec.triggers:
        if trigger.inbox is not None:
            return trigger.inbox.max_message_bytes
    return Inbox.model_fields["max_message_bytes"].default  # type: ignore[no-any-return]
