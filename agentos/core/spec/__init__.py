"""The declarative resources (Agent, QuotaPolicy, Model, ToolServer): schema and loading.

Operators describe agents and quota policies in YAML; ``agentos apply`` must validate a
whole set of files before it changes anything and, when something is wrong, name every
problem with its file, line and field. This package owns that contract: the pydantic
models are the schema (also exported as JSON Schema for editors), and the loaders turn
YAML text into validated resources or one :class:`SpecError` listing all issues.

One module per job, in layers (each imports only those below it):

- :mod:`~agentos.core.spec.loader`: YAML text and files in, documents or one error out;
- :mod:`~agentos.core.spec.resources`: any resource, its canonical form, documents and
  issues;
- one module per kind: :mod:`~agentos.core.spec.agent`, :mod:`~agentos.core.spec.quota`,
  :mod:`~agentos.core.spec.toolserver`, :mod:`~agentos.core.spec.model`;
- :mod:`~agentos.core.spec.route`: routes, placement, evaluators and prices, which
  several kinds use; below all of them, :mod:`agentos.core.specbase` (names, metadata,
  the model base, issue paths).

This module re-exports the names callers use, so ``from agentos.core.spec import ...``
is the one import path. It is a pure core: no I/O besides reading the files it is asked
to read, and no imports of the async or storage layers.
"""

from agentos.core.spec.agent import (
    INBOX_MAX_DEPTH,
    TRIGGER_KINDS,
    AgentResource,
    AgentSpec,
    AwareDateTime,
    Backoff,
    CatchUp,
    ContextPolicy,
    CronExpression,
    Entrypoint,
    Hibernation,
    Inbox,
    KeepKV,
    OnOverflow,
    Overlap,
    RestartPolicy,
    Trigger,
    TriggerKind,
    inbox_limit,
)
from agentos.core.spec.loader import MAX_EXPANDED_NODES, load_paths, parse_resource, parse_text
from agentos.core.spec.model import ModelResource
from agentos.core.spec.quota import (
    METRICS,
    ClassLimits,
    Metric,
    QuotaClass,
    QuotaLimits,
    QuotaPolicyResource,
    QuotaPolicySpec,
    Rule,
    RuleThen,
    RuleWhen,
    Weekday,
)
from agentos.core.spec.resources import (
    KINDS,
    AnyResource,
    Document,
    Resource,
    SpecError,
    SpecIssue,
    canonical,
    json_schema,
)
from agentos.core.spec.toolserver import ToolServerResource
from agentos.core.specbase import API_VERSION, NAME_PATTERN, Metadata, Name, TimeZoneName

__all__ = [
    "API_VERSION",
    "INBOX_MAX_DEPTH",
    "KINDS",
    "MAX_EXPANDED_NODES",
    "METRICS",
    "NAME_PATTERN",
    "TRIGGER_KINDS",
    "AgentResource",
    "AgentSpec",
    "AnyResource",
    "AwareDateTime",
    "Backoff",
    "CatchUp",
    "ClassLimits",
    "ContextPolicy",
    "CronExpression",
    "Document",
    "Entrypoint",
    "Hibernation",
    "Inbox",
    "KeepKV",
    "Metadata",
    "Metric",
    "ModelResource",
    "Name",
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
    "TimeZoneName",
    "ToolServerResource",
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
