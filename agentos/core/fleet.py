"""What applying documents would do to the fleet, decided without I/O.

``agentos apply`` validates each document on its own (:mod:`agentos.core.spec`); what
only the fleet as a whole can say is here: an agent naming a quota class that no policy
defines, two policies defining one class, a policy dropping a class agents still use
(:func:`fleet_issues`, each at its document's line), an agent naming a ToolServer
nobody applied or asking approval for a tool its server denies
(:func:`toolserver_issues`), and which fields of a stored resource an apply changes
(:func:`diff_paths`). Models have theirs in :mod:`agentos.core.models`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from agentos.core.spec import (
    INBOX_MAX_DEPTH,
    AgentResource,
    Document,
    QuotaPolicyResource,
    SpecIssue,
)
from agentos.core.spec.toolserver import ToolServerResource, ToolServerSpec, unreachable_approvals

__all__ = ["DEFAULT_CLASS", "diff_paths", "fleet_issues", "inbox_depth", "toolserver_issues"]

DEFAULT_CLASS = "standard"
"""The quota class agents get when they name none; it exists (unlimited) without a policy."""


def inbox_depth(agent: AgentResource) -> int:
    """The most messages the agent's inbox holds (its first ``inbox`` trigger's
    ``maxDepth``; the default when it declares none)."""
    for trigger in agent.spec.triggers:
        if trigger.inbox is not None:
            return trigger.inbox.depth_limit
    return INBOX_MAX_DEPTH


def fleet_issues(
    documents: Sequence[Document],
    agents: dict[str, str],
    policies: dict[str, QuotaPolicyResource],
) -> list[SpecIssue]:
    """Problems applying ``documents`` would cause with the stored ``agents`` (name ->
    quota class) and ``policies``: each reported at its document."""
    issues: list[SpecIssue] = []
    after = dict(policies)
    policy_docs: dict[str, Document] = {}
    for doc in documents:
        if isinstance(doc.resource, QuotaPolicyResource):
            after[doc.name] = doc.resource
            policy_docs[doc.name] = doc
    owner: dict[str, str] = {}
    for pname in sorted(after, key=lambda n: (n in policy_docs, n)):  # stored ones first
        for cname in after[pname].spec.classes:
            if cname in owner and pname in policy_docs:
                doc = policy_docs[pname]
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "classes", cname),
                        f"spec.classes.{cname}",
                        f'quota class "{cname}" is already defined by policy "{owner[cname]}"; '
                        "class names are fleet-wide",
                    )
                )
            owner.setdefault(cname, pname)
    known = set(owner) | {DEFAULT_CLASS}
    wanted = dict(agents)
    for doc in documents:
        if isinstance(doc.resource, AgentResource):
            wanted[doc.name] = doc.resource.spec.quota_class
            cname = doc.resource.spec.quota_class
            if cname not in known:
                defined = ", ".join(sorted(known))
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "quotaClass"),
                        "spec.quotaClass",
                        f'unknown quota class "{cname}" (defined: {defined}); '
                        "apply a QuotaPolicy that defines it first, or with this agent",
                    )
                )
    for pname, doc in policy_docs.items():
        before = policies.get(pname)
        if before is None:
            continue
        for cname in sorted(set(before.spec.classes) - set(after[pname].spec.classes)):
            users = sorted(a for a, c in wanted.items() if c == cname and cname not in known)
            if users:
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "classes"),
                        "spec.classes",
                        f'removes quota class "{cname}" that agents still use: {", ".join(users)}',
                    )
                )
    return issues


def toolserver_issues(
    documents: Sequence[Document], stored: Mapping[str, Mapping[str, Any]]
) -> list[SpecIssue]:
    """Problems with the ToolServers ``documents`` name, given the ``stored`` ones (name
    -> canonical body): an unknown server in ``spec.tools.servers``, and an approval
    entry for a tool the server denies (it would never ask)."""
    servers: dict[str, ToolServerSpec] = {}
    for name, body in stored.items():
        try:
            servers[name] = ToolServerResource.model_validate(body).spec
        except ValidationError:
            continue  # stored by another version: the apply of it was checked then
    for doc in documents:
        if isinstance(doc.resource, ToolServerResource):
            servers[doc.name] = doc.resource.spec
    listed = ", ".join(sorted(servers)) or "none are applied"
    issues: list[SpecIssue] = []
    for doc in documents:
        resource = doc.resource
        if isinstance(resource, ToolServerResource):
            for entry, why in unreachable_approvals(
                (f"{doc.name}.{p}" for p in resource.spec.approval.required), servers
            ):
                index = resource.spec.approval.required.index(entry.partition(".")[2])
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "approval", "required", index),
                        f"spec.approval.required[{index}]",
                        f"{why}: the approval would never apply (see spec.tools.deny/allow)",
                    )
                )
            continue
        if not isinstance(resource, AgentResource) or resource.spec.tools is None:
            continue
        tools = resource.spec.tools
        for i, server in enumerate(tools.servers):
            if server not in servers:
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "tools", "servers", i),
                        f"spec.tools.servers[{i}]",
                        f'unknown tool server "{server}" (tool servers: {listed}); apply the '
                        "ToolServer first, or with this agent",
                    )
                )
        mine = {s: servers[s] for s in tools.servers if s in servers}
        for entry, why in unreachable_approvals(tools.approval.required, mine):
            index = tools.approval.required.index(entry)
            issues.append(
                SpecIssue(
                    doc.source,
                    doc.line_of("spec", "tools", "approval", "required", index),
                    f"spec.tools.approval.required[{index}]",
                    f"{why}: the approval would never apply",
                )
            )
        for i, entry in enumerate(tools.approval.required):
            server, dot, _ = entry.partition(".")
            if dot and server not in tools.servers and server in servers:
                issues.append(
                    SpecIssue(
                        doc.source,
                        doc.line_of("spec", "tools", "approval", "required", i),
                        f"spec.tools.approval.required[{i}]",
                        f'names tool server "{server}", which spec.tools.servers does not list',
                    )
                )
    return issues


def diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths (``spec.config.limit``, ``spec.triggers[0]``) where two documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(diff_paths(old[key], new[key], path))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            p
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for p in diff_paths(a, b, f"{prefix}[{i}]")
        ]
    return [] if old == new else [prefix or "."]
