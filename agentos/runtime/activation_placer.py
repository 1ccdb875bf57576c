"""Which due agents this daemon may host: its labels against their placement.

A daemon claims only the agents it may host (:func:`agentos.core.placement.hostable`:
its labels against their ``spec.placement`` and their Models' sites). Its
:class:`Placer` reads the specs of the due agents it has not judged yet and remembers
the ones it may not host until the fleet's generation moves (an apply or a delete), so
they cost it nothing while they wait for a daemon that matches. Agents that only some of
the live daemons may host are *pinned*: they are taken whenever there is capacity
(``--max-agents``), outside the fair share, which only the others are balanced by;
otherwise a share computed over every daemon could leave them no room on the few that
match. Kept apart from :mod:`agentos.runtime.activation`, which decides when to claim.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentos.core.modelspec import ModelResource
from agentos.core.placement import (
    ANYWHERE,
    Needs,
    fits,
    hostable,
    model_resources,
    needs_of,
    pinned,
)
from agentos.core.spec import AgentResource, AgentSpec, SpecError, parse_resource
from agentos.store import Store

__all__ = ["Judged", "Placer"]


@dataclass(frozen=True, slots=True)
class Judged:
    """Due agents as a :class:`Placer` found them: ``hosts``, those this daemon may host
    (in the order given); ``pinned``, those of them some other live daemon may not host;
    ``resources``, the specs read to decide, for the start."""

    hosts: list[str]
    pinned: set[str] = field(default_factory=set)
    resources: dict[str, AgentResource] = field(default_factory=dict)


def _agent(body: Mapping[str, Any] | None) -> AgentResource | None:
    if body is None:
        return None
    try:
        resource = parse_resource(body)
    except SpecError:
        return None
    return resource if isinstance(resource, AgentResource) else None


class Placer:
    """Which agents this daemon may host, from its labels, the other live daemons'
    labels (``peers``, kept current by the daemon) and the applied Models (read again
    when the fleet's generation moves). See the module docstring."""

    def __init__(self, store: Store, labels: Mapping[str, str]) -> None:
        self.store = store
        self.labels = dict(labels)
        # The other live daemons that take agents (not draining): their labels by id.
        self.peers: dict[str, dict[str, str]] = {}
        self.models: dict[str, ModelResource | None] = {}
        self._generation: int | None = None
        # Due agents judged and not started here: spec hash and needs (a pass that finds
        # them due again reads no spec); only those of the last pass are kept.
        self._needs: dict[str, tuple[str, Needs]] = {}
        self._rejected: set[str] = set()  # may not be hosted here, as of _generation

    async def refresh(self, generation: int | None = None) -> bool:
        """Read the fleet's generation (unless given); when it moved, read the Models
        again and forget which agents may not be hosted here. True when it moved."""
        if generation is None:
            generation = await self.store.specs.generation()
        if generation == self._generation:
            return False
        self.models = model_resources(await self.store.models.read())
        self._generation = generation
        self._rejected.clear()
        return True

    @property
    def loaded(self) -> bool:
        """Whether the Models were read at least once."""
        return self._generation is not None

    @property
    def rejects(self) -> bool:
        """Whether some agents are known not to be hostable here."""
        return bool(self._rejected)

    def rejected(self, name: str) -> bool:
        """Whether the agent was found not hostable here (since the fleet last changed)."""
        return name in self._rejected

    def reject(self, name: str) -> None:
        """The agent may not be hosted here: leave it to the others until the fleet changes."""
        self._rejected.add(name)

    def here(self, spec: AgentSpec) -> str:
        """Why this daemon may not host the agent of ``spec`` ("" when it may)."""
        return hostable(self.labels, spec, self.models)

    def pinned_of(self, names: Iterable[tuple[str, AgentSpec]]) -> set[str]:
        """The agents of ``names`` (name, spec) that some other live daemon may not host."""
        peers = list(self.peers.values())
        if all(p == self.labels for p in peers):  # every daemon alike: nothing is pinned
            return set()
        return {n for n, spec in names if pinned(peers, needs_of(spec), self.models)}

    async def judge(self, index: Mapping[str, str]) -> Judged:
        """Of the due agents ``index`` (name -> spec hash, in the order to start them),
        those this daemon may host; those it may not are remembered (see
        :meth:`rejected`). An agent whose spec cannot be read counts as hostable: its
        start says what is wrong with it."""
        unknown = [n for n, h in index.items() if n not in self._needs or self._needs[n][0] != h]
        resources: dict[str, AgentResource] = {}
        if unknown:
            bodies = await self.store.specs.agents_of(unknown)
            for name in unknown:
                resource = _agent(bodies.get(name))
                if resource is not None:
                    resources[name] = resource
                    self._needs[name] = (index[name], needs_of(resource.spec))
        self._needs = {n: e for n, e in self._needs.items() if n in index}
        peers = list(self.peers.values())
        alike = all(p == self.labels for p in peers)
        judged = Judged([], set(), resources)
        for name, spec_hash in index.items():
            entry = self._needs.get(name)
            needs = entry[1] if entry is not None and entry[0] == spec_hash else ANYWHERE
            if needs is not ANYWHERE and fits(self.labels, needs, self.models):
                self._rejected.add(name)
                continue
            judged.hosts.append(name)
            if not alike and pinned(peers, needs, self.models):
                judged.pinned.add(name)
        return judged

    def started(self, names: Iterable[str]) -> None:
        """These were claimed here: their needs are read again when next due."""
        for name in names:
            self._needs.pop(name, None)
