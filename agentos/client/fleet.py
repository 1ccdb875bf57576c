"""The desired state: applying and deleting specs, checked against the fleet they join.

A document is valid on its own once parsed (:mod:`agentos.core.spec`); whether it fits
the fleet is decided here, from what is stored: an agent naming a quota class no
policy defines, two policies defining one class, a policy dropping a class agents
still use, a Model or tool server that is not there (the rules themselves are pure,
in :mod:`agentos.core.fleet`, :mod:`agentos.core.models` and
:mod:`agentos.core.metering`). Applying stores all documents or none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agentos.client.errors import InUse
from agentos.core.code import with_code
from agentos.core.errors import NotFound
from agentos.core.fleet import (
    DEFAULT_CLASS,
    diff_paths,
    fleet_issues,
    inbox_depth,
    toolserver_issues,
)
from agentos.core.metering import price_issues
from agentos.core.models import model_issues
from agentos.core.spec import AgentResource, Document, SpecError, inbox_limit
from agentos.governor.evaluator import stored_policies
from agentos.store import AppliedChange, SpecRecord, Store

__all__ = ["apply", "check_fleet", "delete_policy", "spec_hash"]


def spec_hash(document: dict[str, Any]) -> str:
    """A short, stable hash of a canonical resource (what `apply` compares)."""
    body = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


async def apply(
    documents: Sequence[Document], *, store: Store, dry_run: bool
) -> list[AppliedChange]:
    """Store validated documents, all or nothing; returns what changed per resource.

    Raises :class:`SpecError` (with file:line) when the documents do not fit the
    fleet (:func:`check_fleet`).
    """
    await check_fleet(documents, store=store)
    stored_agents = await store.specs.agents_of([d.name for d in documents if d.kind == "Agent"])
    stored_policies = (
        await store.specs.policies() if any(d.kind == "QuotaPolicy" for d in documents) else {}
    )
    before = {("Agent", n): b for n, b in stored_agents.items()}
    before |= {("QuotaPolicy", n): b for n, b in stored_policies.items()}
    bodies = with_code(documents)
    records = []
    for doc, body in zip(documents, bodies, strict=True):
        agent = doc.resource if isinstance(doc.resource, AgentResource) else None
        records.append(
            SpecRecord(
                doc.kind,
                doc.name,
                json.dumps(body, sort_keys=True),
                spec_hash(body),
                agent.spec.priority if agent is not None else 0,
                inbox_limit(agent) if agent is not None else None,
                inbox_depth(agent) if agent is not None else None,
            )
        )
    changes = await store.specs.apply(records, dry_run=dry_run)
    by_key = {(d.kind, d.name): b for d, b in zip(documents, bodies, strict=True)}
    return [
        replace(c, fields=tuple(diff_paths(before[(c.kind, c.name)], by_key[(c.kind, c.name)])))
        if c.action == "configured" and (c.kind, c.name) in before
        else c
        for c in changes
    ]


async def check_fleet(documents: Sequence[Document], *, store: Store) -> None:
    """Raise :class:`SpecError` naming every way ``documents`` do not fit the stored
    fleet: quota classes, Models, prices, tool servers."""
    agents = {
        name: str(body.get("spec", {}).get("quotaClass", DEFAULT_CLASS))
        for name, body in (await store.specs.agents()).items()
    }
    policies = stored_policies(await store.specs.policies())
    issues = fleet_issues(documents, agents, policies)
    issues += model_issues(documents, await store.models.read())
    issues += price_issues(documents, policies)
    issues += toolserver_issues(documents, await store.specs.toolservers())
    if issues:
        raise SpecError(issues)


async def delete_policy(name: str, *, store: Store) -> None:
    """Delete a QuotaPolicy. Raises :class:`NotFound` when there is none by that name,
    :class:`InUse` when agents use one of its classes."""
    policies = stored_policies(await store.specs.policies())
    policy = policies.get(name)
    if policy is not None:
        users = sorted(
            agent
            for agent, body in (await store.specs.agents()).items()
            if body.get("spec", {}).get("quotaClass", DEFAULT_CLASS) in policy.spec.classes
            and body.get("spec", {}).get("quotaClass", DEFAULT_CLASS) != DEFAULT_CLASS
        )
        if users:
            raise InUse(
                f'policy "{name}" defines quota classes used by agents '
                f"{', '.join(users)}; move them to another class or delete them first"
            )
    if not await store.specs.delete("QuotaPolicy", name):
        raise NotFound(f'policy "{name}" not found')
