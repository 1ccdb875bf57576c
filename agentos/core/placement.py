"""How many agents one daemon of a fleet may hold: the fair share, from the live daemons.

Daemons that share a Redis split the agents between them without a coordinator: each
one counts the live daemons in the heartbeat hash, computes the same share of the
fleet, and holds at most that share plus a margin. Under its limit a daemon takes free
agents; over it (a daemon joined, so the share shrank) it hands its idle ones over. The
margin is the hysteresis that keeps agents from bouncing between daemons: a daemon
sheds only above ``share + margin`` and takes only up to it, so one that just shed
never takes the same agents back, and small differences in when daemons look move
nothing. These are pure functions of the heartbeats and ``now``; the daemon performs
the result through :func:`agentos.core.reconcile.reconcile`.

Which daemons may host an agent at all is decided here too. A daemon has labels
(``agentos daemon --labels site=host-a,region=eu``, published in its heartbeat); an
agent's ``spec.placement.daemons`` is a node selector over them, and a ``local`` Model
with a ``placement.site`` is served only by the daemons of that site
(:func:`serves_model`, :func:`hostable`). A daemon activates only what it may host; a
client tells an agent that no live daemon may host (:func:`unschedulable`). An agent
that only some of the live daemons may host is *pinned*: it is left out of the fair
share (only the matching daemons may take it, so balancing it over every daemon could
leave it with no room anywhere).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agentos.core.route import DEFAULT_BOUNDARY, within
from agentos.core.spec import AgentSpec, SpecError, parse_resource
from agentos.core.spec.model import ModelResource

__all__ = [
    "ANYWHERE",
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_MODEL",
    "HANDOVER_BATCH",
    "SHARE_MARGIN",
    "Needs",
    "fair_share",
    "fits",
    "format_labels",
    "hostable",
    "live_daemons",
    "live_labels",
    "model_resources",
    "needs_of",
    "needs_of_body",
    "pinned",
    "serves_model",
    "share_limit",
    "unschedulable",
]

SHARE_MARGIN = 0.10
"""A daemon may hold its share plus this fraction of it (at least one agent more)."""

HANDOVER_BATCH = 20
"""At most this many agents of one daemon are being handed over at any moment: a daemon
far over its share (the first of several started together took everything) sheds in
waves instead of stopping hundreds of agents at once."""


def fair_share(agents: int, daemons: int) -> int:
    """``ceil(agents / daemons)``: what each of ``daemons`` live daemons should hold."""
    if agents <= 0:
        return 0
    return math.ceil(agents / max(1, daemons))


def share_limit(
    agents: int, daemons: int, *, capacity: int | None = None, margin: float = SHARE_MARGIN
) -> int:
    """The most agents one daemon may hold: its fair share plus the margin
    (``max(1, ceil(share * margin))``), and never more than its ``capacity``
    (``--max-agents``)."""
    share = fair_share(agents, daemons)
    limit = share + max(1, math.ceil(share * margin))
    return limit if capacity is None else min(capacity, limit)


def live_daemons(
    heartbeats: Mapping[str, Mapping[str, object]],
    now: float,
    *,
    me: str,
    fresh_s: float,
) -> int:
    """How many daemons share the fleet: those whose heartbeat's ``seen_at`` is newer
    than ``fresh_s`` before ``now`` and that are not ``draining``, counting ``me``
    always (a daemon that asks is alive, whether or not its heartbeat got through)."""
    live = {me}
    for daemon_id, info in heartbeats.items():
        seen_at = info.get("seen_at")
        if info.get("draining") or not isinstance(seen_at, int | float):
            continue
        if now - float(seen_at) < fresh_s:
            live.add(daemon_id)
    return len(live)


def serves_model(labels: Mapping[str, str], model: ModelResource | None) -> str:
    """Why a daemon labelled ``labels`` may not serve ``model`` ("" when it may).

    A ``local`` Model with a ``placement.site`` runs next to its agents at that site
    only: it is served by the daemons labelled ``site=<site>``. Every other Model (and
    the daemon's own engine, ``None``) is served by any daemon.
    """
    if model is None:
        return ""
    spec = model.spec
    site = spec.placement.site if spec.placement is not None else None
    if spec.tier != "local" or site is None:
        return ""
    if labels.get("site") == site:
        return ""
    here = labels.get("site")
    return (
        f"local model {model.metadata.name} runs at site {site} only "
        f"(this daemon: {'site=' + here if here else 'no site label'})"
    )


# ---------------------------------------------------------------- daemon labels

DEFAULT_MODEL = "default"  # the daemon's own engine: served by every daemon
DEFAULT_LEASE_TTL_S = 15.0
"""How fresh a heartbeat must be when it does not say (``lease_ttl_s``): the default lease."""


@dataclass(frozen=True, slots=True)
class Needs:
    """What an agent asks of the daemon that hosts it: labels (``spec.placement.daemons``,
    as sorted pairs) and its models: with one model that one must be served there; with
    a ``route`` at least one of them."""

    selector: tuple[tuple[str, str], ...] = ()
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    route: bool = False
    data_class: str = "any"  # a route's: only candidates within it count


ANYWHERE = Needs()
"""An agent with no selector on the daemon's own engine: every daemon may host it."""


def needs_of(spec: AgentSpec) -> Needs:
    """What ``spec`` asks of the daemon that hosts it."""
    selector = tuple(sorted(spec.placement.daemons.items())) if spec.placement else ()
    route = spec.route
    data_class = route.data_class if route is not None else "any"
    needs = Needs(selector, tuple(spec.models), route is not None, data_class)
    return ANYWHERE if needs == ANYWHERE else needs


def needs_of_body(spec: Mapping[str, Any]) -> Needs:
    """:func:`needs_of` for an Agent's ``spec`` as stored (the canonical form, validated
    when it was applied): what a client reads, without validating every spec again."""
    placement = spec.get("placement") or {}
    selector = tuple(sorted((str(k), str(v)) for k, v in (placement.get("daemons") or {}).items()))
    route = spec.get("route")
    if isinstance(route, Mapping):
        models = tuple(str(m) for m in route.get("models") or ())
        needs = Needs(selector, models, True, str(route.get("dataClass") or "any"))
    else:
        needs = Needs(selector, (str(spec.get("model") or DEFAULT_MODEL),))
    return ANYWHERE if needs == ANYWHERE else needs


def format_labels(labels: Mapping[str, str]) -> str:
    """``region=eu,site=a`` (sorted); "" for none."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def fits(
    labels: Mapping[str, str], needs: Needs, models: Mapping[str, ModelResource | None]
) -> str:
    """Why a daemon labelled ``labels`` may not host an agent with ``needs`` ("" when it
    may). ``models``: the applied Models by name (one missing counts as served
    anywhere: the agent's start says that it is not applied)."""
    missing = [f"{k}={v}" for k, v in needs.selector if labels.get(k) != v]
    if missing:
        return (
            f"placement.daemons wants {', '.join(missing)} "
            f"(this daemon: {format_labels(labels) or 'no labels'})"
        )
    if needs == ANYWHERE:
        return ""
    if not needs.route:
        return serves_model(labels, models.get(needs.models[0])) if needs.models else ""
    reasons = [_serves_within(labels, m, models.get(m), needs.data_class) for m in needs.models]
    if not reasons or "" in reasons:
        return ""
    return "no model of its route is served here: " + "; ".join(reasons)


def _serves_within(
    labels: Mapping[str, str], name: str, model: ModelResource | None, data_class: str
) -> str:
    """Why a route candidate cannot serve the agent from this daemon ("" when it can):
    not served here, or outside the route's ``dataClass`` (the route never uses it)."""
    if model is None:
        boundary, region = (DEFAULT_BOUNDARY if name == DEFAULT_MODEL else "any"), None
    else:
        placement = model.spec.placement
        boundary = model.spec.data_boundary
        region = placement.region if placement is not None else None
    if not within(boundary, data_class, region):
        return f"{name} is outside dataClass {data_class}"
    return serves_model(labels, model)


def hostable(
    labels: Mapping[str, str], spec: AgentSpec, models: Mapping[str, ModelResource | None]
) -> str:
    """Why a daemon labelled ``labels`` may not host the agent of ``spec`` ("" when it
    may): every pair of ``spec.placement.daemons`` must be among the labels; an agent
    with one model must have it served there (:func:`serves_model`), a route agent at
    least one of ``route.models``."""
    return fits(labels, needs_of(spec), models)


def live_labels(
    heartbeats: Mapping[str, Mapping[str, object]],
    now: float,
    *,
    fresh_s: float | None = None,
) -> dict[str, dict[str, str]]:
    """The labels of the daemons that take agents now, by id: a heartbeat newer than
    ``fresh_s`` before ``now`` (default: its own ``lease_ttl_s``, else
    :data:`DEFAULT_LEASE_TTL_S`) that is not ``draining``. A heartbeat without labels
    (or with ones that are not text) counts as a daemon with none."""
    out: dict[str, dict[str, str]] = {}
    for daemon_id, info in heartbeats.items():
        seen_at = info.get("seen_at")
        if info.get("draining") or not isinstance(seen_at, int | float):
            continue
        ttl = info.get("lease_ttl_s")
        window = fresh_s if fresh_s is not None else ttl if isinstance(ttl, int | float) else None
        if now - float(seen_at) >= (DEFAULT_LEASE_TTL_S if window is None else window):
            continue
        labels = info.get("labels")
        out[daemon_id] = (
            {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(labels, Mapping)
            else {}
        )
    return out


def _needs_text(needs: Needs, models: Mapping[str, ModelResource | None]) -> str:
    parts = []
    if needs.selector:
        parts.append("daemons labelled " + ",".join(f"{k}={v}" for k, v in needs.selector))
    sites = []
    for name in needs.models:
        model = models.get(name)
        site = model.spec.placement.site if model and model.spec.placement else None
        if model is not None and model.spec.tier == "local" and site is not None:
            sites.append(f"{name} at site {site}")
        elif needs.route:  # a candidate served anywhere: the route asks nothing
            sites = []
            break
    if sites:
        parts.append(("one of the route's models " if needs.route else "model ") + ", ".join(sites))
    return " and ".join(parts) or "nothing a daemon could lack"


def unschedulable(
    daemons: Mapping[str, Mapping[str, str]],
    needs: Needs,
    models: Mapping[str, ModelResource | None],
) -> str:
    """Why none of the live ``daemons`` (id -> labels) may host an agent with ``needs``:
    what it asks for and every live daemon's labels. "" when one may, and when none is
    live (then nothing runs at all, whatever the agent asks)."""
    if not daemons or any(not fits(labels, needs, models) for labels in daemons.values()):
        return ""
    seen = ", ".join(
        f"{d} ({format_labels(labels) or 'no labels'})" for d, labels in sorted(daemons.items())
    )
    return (
        f"no live daemon can host it: it needs {_needs_text(needs, models)}; live daemons: {seen}"
    )


def model_resources(bodies: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelResource | None]:
    """The stored Model resources by name (one that no longer validates: None, served
    anywhere as far as placement goes)."""
    out: dict[str, ModelResource | None] = {}
    for name, body in bodies.items():
        try:
            resource = parse_resource(body)
        except SpecError:
            resource = None
        out[name] = resource if isinstance(resource, ModelResource) else None
    return out


def pinned(
    peers: Iterable[Mapping[str, str]],
    needs: Needs,
    models: Mapping[str, ModelResource | None],
) -> bool:
    """Whether some of ``peers`` (the other live daemons' labels) may not host an agent
    with ``needs``: then it is pinned, left out of the fair share."""
    return needs != ANYWHERE and any(fits(labels, needs, models) for labels in peers)
