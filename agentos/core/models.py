"""Checks across documents that involve models: what ``apply`` refuses before it writes.

An agent naming a model nobody declared would start and then fail on its first call;
a fallback naming an unknown model would only fail when the primary is down, the worst
moment to learn of it. Both are refused at apply, at the line that names the model,
against the stored models plus those applied with it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from agentos.core.route import DEFAULT_BOUNDARY, within
from agentos.core.spec import AgentResource, Document, SpecError, SpecIssue, parse_resource
from agentos.core.spec.model import ModelResource
from agentos.core.spec.route import Route

__all__ = ["DEFAULT_MODEL", "model_issues", "model_users"]

DEFAULT_MODEL = "default"
"""What ``spec.model`` means when it names no Model: the daemon's own ``--engine``."""


def model_issues(
    documents: Sequence[Document], stored: Mapping[str, Mapping[str, Any]] | Collection[str]
) -> list[SpecIssue]:
    """Problems with the models ``documents`` name, given the ``stored`` Models (name ->
    canonical body; names alone check existence only)."""
    resources: dict[str, ModelResource | None] = {}
    for name in stored:
        body = stored[name] if isinstance(stored, Mapping) else None
        resources[name] = _parsed(body)
    for doc in documents:
        if isinstance(doc.resource, ModelResource):
            resources[doc.name] = doc.resource
    known = set(resources)
    listed = ", ".join(sorted(known)) or "none are applied"
    issues: list[SpecIssue] = []
    for doc in documents:
        resource = doc.resource
        if isinstance(resource, AgentResource):
            route = resource.spec.route
            if route is not None:
                issues += _route_issues(doc, route, resources, listed)
                continue
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


def _parsed(body: Mapping[str, Any] | None) -> ModelResource | None:
    if body is None:
        return None
    try:
        resource = parse_resource(body)
    except SpecError:
        return None
    return resource if isinstance(resource, ModelResource) else None


def _route_issues(
    doc: Document,
    route: Route,
    resources: Mapping[str, ModelResource | None],
    listed: str,
) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    boundaries: list[tuple[str, str | None]] = []
    for index, model in enumerate(route.models):
        if model == DEFAULT_MODEL:
            boundaries.append((DEFAULT_BOUNDARY, None))
        elif model not in resources:
            issues.append(
                SpecIssue(
                    doc.source,
                    doc.line_of("spec", "route", "models", index),
                    f"spec.route.models[{index}]",
                    f'unknown model "{model}" (models: {listed}); apply the Model first, '
                    "or with this agent",
                )
            )
        else:
            found = resources[model]
            if found is None:
                boundaries.append(("any", None))
            else:
                placement = found.spec.placement
                region = placement.region if placement is not None else None
                boundaries.append((found.spec.data_boundary, region))
    if not issues and not any(within(b, route.data_class, r) for b, r in boundaries):
        shown = ", ".join(
            f"{m} ({b}{f' in region {r}' if r else ''})"
            for m, (b, r) in zip(route.models, boundaries, strict=True)
        )
        issues.append(
            SpecIssue(
                doc.source,
                doc.line_of("spec", "route", "dataClass"),
                "spec.route.dataClass",
                f"no candidate keeps data within {route.data_class}: {shown}; add a model "
                "whose placement.dataBoundary is within it",
            )
        )
    return issues


def model_users(model: str, agents: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Names of the stored agents (name -> canonical body) whose ``spec.model`` is ``model``."""
    users = []
    for name, body in agents.items():
        spec = body.get("spec")
        if not isinstance(spec, Mapping):
            continue
        route = spec.get("route")
        if isinstance(route, Mapping):
            uses = model in (route.get("models") or ())
        else:
            uses = spec.get("model", DEFAULT_MODEL) == model
        if uses:
            users.append(name)
    return sorted(users)
