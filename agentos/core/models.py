"""Checks across documents that involve models: what ``apply`` refuses before it writes.

An agent naming a model nobody declared would start and then fail on its first call;
a fallback naming an unknown model would only fail when the primary is down, the worst
moment to learn of it. Both are refused at apply, at the line that names the model,
against the stored models plus those applied with it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from agentos.core.modelspec import ModelResource
from agentos.core.spec import AgentResource, Document, SpecIssue

__all__ = ["DEFAULT_MODEL", "model_issues", "model_users"]

DEFAULT_MODEL = "default"
"""What ``spec.model`` means when it names no Model: the daemon's own ``--engine``."""


def model_issues(documents: Sequence[Document], stored: Collection[str]) -> list[SpecIssue]:
    """Problems with the models ``documents`` name, given the ``stored`` Model names."""
    known = set(stored) | {d.name for d in documents if isinstance(d.resource, ModelResource)}
    listed = ", ".join(sorted(known)) or "none are applied"
    issues: list[SpecIssue] = []
    for doc in documents:
        resource = doc.resource
        if isinstance(resource, AgentResource):
            model = resource.spec.model
            if model != DEFAULT_MODEL and model not in known:
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "model"),
                        "spec.model",
                        f'unknown model "{model}" (models: {listed}; "default" is the '
                        "daemon's --engine); apply the Model first, or with this agent",
                    )
                )
        elif isinstance(resource, ModelResource):
            fallback = resource.spec.fallback
            if fallback is not None and fallback != DEFAULT_MODEL and fallback not in known:
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "fallback"),
                        "spec.fallback",
                        f'unknown fallback model "{fallback}" (models: {listed})',
                    )
                )
    return issues


def model_users(model: str, agents: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Names of the stored agents (name -> canonical body) whose ``spec.model`` is ``model``."""
    users = []
    for name, body in agents.items():
        spec = body.get("spec")
        if isinstance(spec, Mapping) and spec.get("model", DEFAULT_MODEL) == model:
            users.append(name)
    return sorted(users)
