"""``kind: Agent``: the desired state of one agent and how it is woken.

An agent names its entrypoint (the class the daemon runs), the model or route its calls
go to, its triggers (cron schedules, heartbeats, fixed intervals, a one-off time, an
inbox), when it hibernates, how it is restarted after a crash, its task limits and the
tools it may use. Each field checks its own value and says what it expected, so that
``agentos apply`` names every problem at once (the loader in
:mod:`agentos.core.spec.loader` turns the issues into file, line and field). Pure:
validation only, no I/O.
"""

import difflib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Literal, Self, get_args

from croniter import croniter
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

from agentos.core.durations import Duration, PositiveDuration, format_duration
from agentos.core.errors import DEFAULT_MAX_MESSAGE_BYTES
from agentos.core.limits import TaskLimits
from agentos.core.spec.route import AgentPlacement, Evaluate, Route
from agentos.core.spec.toolserver import AgentTools
from agentos.core.specbase import (
    API_VERSION,
    Metadata,
    Name,
    TimeZoneName,
    _error,
    _errors,
    _Model,
    _show,
)

__all__ = [
    "INBOX_MAX_DEPTH",
    "TRIGGER_KINDS",
    "AgentResource",
    "AgentSpec",
    "AwareDateTime",
    "Backoff",
    "CatchUp",
    "ContextPolicy",
    "CronExpression",
    "Entrypoint",
    "Hibernation",
    "Inbox",
    "KeepKV",
    "OnOverflow",
    "Overlap",
    "RestartPolicy",
    "Trigger",
    "TriggerKind",
    "inbox_limit",
]

_ENTRYPOINT_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
)


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

CatchUp = Literal["skip", "one", "all"]
Overlap = Literal["skip", "queue", "cancelPrevious"]
KeepKV = Literal["auto", "always", "never"]
TriggerKind = Literal["schedule", "heartbeat", "every", "at", "inbox"]
TRIGGER_KINDS: Final[tuple[TriggerKind, ...]] = get_args(TriggerKind)

# Options that only mean something for triggers that recur on a clock.
_CLOCK_TRIGGERS: Final = ("schedule", "every")
_CLOCK_OPTIONS: Final = ("timezone", "catch_up", "overlap")
_CLOCK_OPTION_KEYS: Final = frozenset({"timezone", "catchUp", "catch_up", "overlap"})


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


def inbox_limit(agent: AgentResource) -> int:
    """The largest message, in bytes, the agent's inbox accepts (its first ``inbox``
    trigger's ``maxMessageBytes``; the default when it declares none)."""
    for trigger in agent.spec.triggers:
        if trigger.inbox is not None:
            return trigger.inbox.max_message_bytes
    return Inbox.model_fields["max_message_bytes"].default  # type: ignore[no-any-return]
