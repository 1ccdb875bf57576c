"""Daemon labels and agent placement: which daemons may host which agents.

Pure tables for :mod:`agentos.core.placement` (``serves_model``, ``hostable``, pinned
agents, the ``Unschedulable`` message) and for parsing ``--labels``; the CLI's exit code
on a bad pair; then two real daemons (``site=a``, ``site=b``) on one Redis: an agent
placed on ``site=b`` runs only there, one that matches no daemon is ``Unschedulable`` in
``ps`` and ``describe`` and never runs, an agent of a local Model at ``site=a`` runs only
on ``site=a``, a respec or a moved Model hands a held agent to the daemon that matches,
and agents pinned to one daemon all run there even past its fair share.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from agentos.cli.render import _daemons_table, _describe_text
from agentos.client import Client
from agentos.core.modelspec import ModelResource
from agentos.core.placement import (
    ANYWHERE,
    Needs,
    fits,
    hostable,
    live_labels,
    needs_of,
    needs_of_body,
    pinned,
    serves_model,
    share_limit,
    unschedulable,
)
from agentos.core.spec import AgentResource, canonical, parse_resource
from agentos.daemon import Daemon
from agentos.settings import LABELS_ENV, DaemonSettings, daemon_labels, parse_labels
from agentos.store import Store
from tests.cli_support import base_env, cli, show
from tests.helpers import agent_doc, apply, finished, policy_doc, running_daemon, wait_until

pytestmark = pytest.mark.anyio

ECHO = "tests.fixture_agents:Echo"
INBOX: dict[str, Any] = {"triggers": [{"inbox": {}}]}
ROOT = Path(__file__).resolve().parents[3]


def _model(name: str, **spec: Any) -> ModelResource:
    body = {"apiVersion": "agentos/v1", "kind": "Model", "metadata": {"name": name}}
    resource = parse_resource({**body, "spec": {"engine": "sim", **spec}})
    assert isinstance(resource, ModelResource)
    return resource


def _agent(**spec: Any) -> AgentResource:
    resource = parse_resource(
        {
            "apiVersion": "agentos/v1",
            "kind": "Agent",
            "metadata": {"name": "x"},
            "spec": {"entrypoint": ECHO, **spec},
        }
    )
    assert isinstance(resource, AgentResource)
    return resource


MODELS: dict[str, ModelResource | None] = {
    "local-a": _model("local-a", placement={"site": "a"}),
    "local-c": _model("local-c", placement={"site": "c"}),
    "local-any": _model("local-any"),
    "regional-a": _model("regional-a", placement={"tier": "regional", "site": "a"}),
    "hosted": _model(
        "hosted", engine="openai", endpoints=[{"url": "http://h/v1"}], servedModel="m"
    ),
}
A = {"site": "a"}
B = {"site": "b", "region": "eu"}
NONE: dict[str, str] = {}


# ---------------------------------------------------------------- the pure core


@pytest.mark.parametrize(
    ("labels", "model", "served"),
    [
        pytest.param(A, "local-a", True, id="local-at-its-site"),
        pytest.param(B, "local-a", False, id="local-elsewhere"),
        pytest.param(NONE, "local-a", False, id="local-no-site-label"),
        pytest.param(NONE, "local-any", True, id="local-without-site-anywhere"),
        pytest.param(B, "regional-a", True, id="regional-anywhere"),
        pytest.param(NONE, "hosted", True, id="hosted-anywhere"),
        pytest.param(NONE, None, True, id="default-model"),
    ],
)
def test_serves_model(labels: dict[str, str], model: str | None, served: bool) -> None:
    why = serves_model(labels, None if model is None else MODELS[model])
    assert (why == "") is served, why
    if not served:
        assert "site a" in why


@pytest.mark.parametrize(
    ("labels", "spec", "why"),
    [
        pytest.param(NONE, {}, "", id="nothing-asked"),
        pytest.param(B, {"placement": {"daemons": {"site": "b"}}}, "", id="selector-matches"),
        pytest.param(
            B, {"placement": {"daemons": {"site": "b", "region": "eu"}}}, "", id="all-pairs"
        ),
        pytest.param(
            B,
            {"placement": {"daemons": {"site": "b", "region": "us"}}},
            "placement.daemons wants region=us (this daemon: region=eu,site=b)",
            id="one-pair-differs",
        ),
        pytest.param(
            NONE,
            {"placement": {"daemons": {"site": "b"}}},
            "placement.daemons wants site=b (this daemon: no labels)",
            id="unlabelled-daemon",
        ),
        pytest.param(A, {"model": "local-a"}, "", id="local-model-here"),
        pytest.param(B, {"model": "local-a"}, "local model local-a", id="local-model-elsewhere"),
        pytest.param(
            A,
            {"model": "local-a", "placement": {"daemons": {"site": "b"}}},
            "placement.daemons wants site=b",
            id="selector-first",
        ),
        pytest.param(B, {"model": "hosted"}, "", id="hosted-model"),
        pytest.param(B, {"model": "missing"}, "", id="model-not-applied"),
        pytest.param(B, {"route": {"models": ["local-a", "hosted"]}}, "", id="route-one-servable"),
        pytest.param(
            B,
            {"route": {"models": ["local-a", "local-c"]}},
            "no model of its route is served here",
            id="route-none-servable",
        ),
        pytest.param(A, {"route": {"models": ["local-c", "local-a"]}}, "", id="route-second"),
    ],
)
def test_hostable(labels: dict[str, str], spec: dict[str, Any], why: str) -> None:
    resource = _agent(**spec)
    found = hostable(labels, resource.spec, MODELS)
    assert (found == "") is (why == ""), found
    assert why in found
    # A client reads the stored form: the same needs, without validating again.
    assert needs_of_body(canonical(resource)["spec"]) == needs_of(resource.spec)


def test_an_agent_that_asks_nothing_fits_anywhere_and_is_never_pinned() -> None:
    assert needs_of(_agent().spec) is ANYWHERE
    assert fits(B, ANYWHERE, {}) == ""
    assert not pinned([A, B, NONE], ANYWHERE, MODELS)


@pytest.mark.parametrize(
    ("peers", "spec", "expected"),
    [
        pytest.param([B], {"placement": {"daemons": {"site": "b"}}}, False, id="all-match"),
        pytest.param([B, A], {"placement": {"daemons": {"site": "b"}}}, True, id="one-does-not"),
        pytest.param([], {"placement": {"daemons": {"site": "b"}}}, False, id="alone"),
        pytest.param([B], {"model": "local-a"}, True, id="model-site"),
        pytest.param([A, B], {"model": "hosted"}, False, id="hosted"),
    ],
)
def test_pinned(peers: list[dict[str, str]], spec: dict[str, Any], expected: bool) -> None:
    assert pinned(peers, needs_of(_agent(**spec).spec), MODELS) is expected


def test_unschedulable_names_what_the_agent_needs_and_every_live_daemons_labels() -> None:
    daemons = {"d-a": A, "d-b": B, "d-0": NONE}
    needs = needs_of(_agent(model="local-c", placement={"daemons": {"site": "b"}}).spec)
    message = unschedulable(daemons, needs, MODELS)
    assert message == (
        "no live daemon can host it: it needs daemons labelled site=b and model local-c at "
        "site c; live daemons: d-0 (no labels), d-a (site=a), d-b (region=eu,site=b)"
    )
    route = needs_of(_agent(route={"models": ["local-a", "local-c"]}).spec)
    assert "one of the route's models local-a at site a, local-c at site c" in unschedulable(
        {"d-b": B}, route, MODELS
    )
    assert unschedulable(daemons, needs_of(_agent(model="local-a").spec), MODELS) == ""
    assert unschedulable({}, needs, MODELS) == "", "no live daemon: nothing to blame"


def test_live_labels_are_those_of_fresh_daemons_that_take_agents() -> None:
    now = 1000.0
    beats: dict[str, dict[str, object]] = {
        "fresh": {"seen_at": now - 1, "labels": {"site": "a"}},
        "old": {"seen_at": now - 20, "labels": {"site": "b"}},
        "slow": {"seen_at": now - 20, "labels": {"site": "c"}, "lease_ttl_s": 60.0},
        "draining": {"seen_at": now, "labels": {"site": "d"}, "draining": True},
        "unlabelled": {"seen_at": now},
        "garbled": {"seen_at": now, "labels": ["site=a"]},
    }
    assert live_labels(beats, now) == {
        "fresh": {"site": "a"},
        "slow": {"site": "c"},
        "unlabelled": {},
        "garbled": {},
    }
    assert set(live_labels(beats, now, fresh_s=5.0)) == {"fresh", "unlabelled", "garbled"}


# ---------------------------------------------------------------- --labels


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("", {}),
        ("  ", {}),
        ("site=host-a,region=eu", {"site": "host-a", "region": "eu"}),
        (" site = a , tier=gpu ", {"site": "a", "tier": "gpu"}),
        ("example.com/zone=z1", {"example.com/zone": "z1"}),
        ("empty=", {"empty": ""}),
    ],
)
def test_parse_labels(text: str, labels: dict[str, str]) -> None:
    assert parse_labels(text) == labels


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("site", "--labels: 'site' is not NAME=VALUE"),
        ("site=a,,region=eu", "--labels: '' is not NAME=VALUE"),
        ("=a", "--labels: '=a' is not NAME=VALUE"),
        ("site=a b", "--labels: 'site=a b': site='a b' is not a label value"),
        ("sí=a", "--labels: 'sí=a': 'sí' is not a label name"),
        ("site=a,site=b", "--labels: 'site=b': label site is given twice"),
    ],
)
def test_bad_labels_name_the_pair(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^--labels: ") as caught:
        parse_labels(text)
    assert str(caught.value).startswith(message), caught.value


def test_the_flag_wins_over_the_environment() -> None:
    env = {LABELS_ENV: "site=env"}
    assert daemon_labels(None, env) == {"site": "env"}
    assert daemon_labels("site=flag", env) == {"site": "flag"}
    assert daemon_labels("", env) == {}
    assert daemon_labels(None, {}) == {}
    with pytest.raises(ValueError, match=LABELS_ENV):
        daemon_labels(None, {LABELS_ENV: "oops"})
    with pytest.raises(ValueError, match="not a label"):
        DaemonSettings(labels={"site": "a b"})


async def test_a_bad_pair_is_exit_code_2_and_starts_nothing(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "AGENTOS_REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = await cli(env, "daemon", "--labels", "site=a,zone")
    assert proc.returncode == 2, show(proc)
    assert "--labels: 'zone' is not NAME=VALUE" in proc.stderr, show(proc)
    proc = await cli({**env, LABELS_ENV: "site=a b"}, "up", "--engine", "sim", "--for", "1s")
    assert proc.returncode == 2, show(proc)
    assert f"{LABELS_ENV}: 'site=a b'" in proc.stderr, show(proc)


def test_the_k8s_daemons_labels_parse() -> None:
    deployment = yaml.safe_load((ROOT / "ops/k8s/daemon.yaml").read_text())
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    path = env[LABELS_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    assert path == "metadata.annotations['agentos.dev/daemon-labels']"
    labels = parse_labels(template["metadata"]["annotations"]["agentos.dev/daemon-labels"])
    assert labels == {"site": "cluster"}


def test_get_daemons_shows_each_daemons_labels() -> None:
    out = io.StringIO()
    table = _daemons_table(
        {"d-a": {"labels": {"site": "a", "region": "eu"}, "seen_at": 1.0}, "d-0": {"seen_at": 1}}
    )
    Console(file=out, width=200).print(table)
    text = out.getvalue()
    assert "LABELS" in text
    assert "region=eu,site=a" in text


# ---------------------------------------------------------------- two daemons


def _placed(site: str, **spec: Any) -> Any:
    return {"placement": {"daemons": {"site": site}}, **INBOX, **spec}


def _model_doc(name: str, site: str) -> Any:
    return policy_doc(
        {
            "apiVersion": "agentos/v1",
            "kind": "Model",
            "metadata": {"name": name},
            "spec": {"engine": "sim", "placement": {"site": site}},
        }
    )


async def _owner(store: Store, name: str) -> str:
    leases = await store.leases.read([name])
    return leases[name].owner if name in leases else ""


async def _owned_by(store: Store, name: str, daemon: str) -> bool:
    return await _owner(store, name) == daemon


async def _both_see_each_other(*daemons: Daemon) -> None:
    async def seen() -> bool:
        return all(len(d.placer.peers) == len(daemons) - 1 for d in daemons)

    await wait_until(seen, what="each daemon to see the other's labels")


@pytest.mark.redis_tiers
async def test_agents_run_only_on_daemons_that_match_and_one_that_matches_none_says_so(
    store: Store, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    await apply(
        store,
        _model_doc("local-a", "a"),
        agent_doc("on-b", ECHO, **_placed("b")),
        agent_doc("nowhere", ECHO, **_placed("c")),
        agent_doc("uses-local-a", ECHO, model="local-a", **INBOX),
    )
    client = Client(store)
    async with (
        running_daemon(store, daemon_id="d-a", labels={"site": "a"}) as da,
        running_daemon(store, daemon_id="d-b", labels={"site": "b"}) as db,
    ):
        await wait_until(lambda: _owned_by(store, "on-b", "d-b"), what="on-b on d-b")
        await wait_until(lambda: _owned_by(store, "uses-local-a", "d-a"), what="local-a's user")
        sent = {n: await client.send(n, f"hello {n}") for n in ("on-b", "uses-local-a")}
        for name, msg_id in sent.items():
            assert (await finished(store, name, f"m-{msg_id}"))["status"] == "succeeded"
        assert set(db.runners) == {"on-b"}
        assert set(da.runners) == {"uses-local-a"}

        # Each daemon looked at "nowhere" and left it: neither may host it.
        async def both_passed() -> bool:
            return da.placer.rejected("nowhere") and db.placer.rejected("nowhere")

        await wait_until(both_passed, what="both daemons to pass over the unplaceable agent")
        rows = {r.name: r for r in await client.agents()}
        row = rows["nowhere"]
        assert (row.phase, row.reason) == ("Pending", "Unschedulable")
        assert row.message == (
            "no live daemon can host it: it needs daemons labelled site=c; "
            "live daemons: d-a (site=a), d-b (site=b)"
        )
        assert rows["on-b"].reason != "Unschedulable"
        assert rows["uses-local-a"].reason != "Unschedulable"
        detail = await client.describe("nowhere")
        assert detail.status["reason"] == "Unschedulable"
        text = _describe_text(detail.stored())
        assert "Phase:         Pending (Unschedulable)" in text
        assert "Message:       no live daemon can host it" in text
        assert "Placement:     daemons labelled site=c" in text
        env = {**base_env(tmp_path), "AGENTOS_REDIS_URL": redis_url, "AGENTOS_NAMESPACE": namespace}
        ps = await cli(env, "ps", "-o", "json")
        assert ps.returncode == 0, show(ps)
        shown = {r["name"]: r for r in json.loads(ps.stdout)}
        assert shown["nowhere"]["reason"] == "Unschedulable"
        assert "site=c" in shown["nowhere"]["message"]
        beats = await client.daemons()
        assert beats["d-a"]["labels"] == {"site": "a"}
        assert beats["d-b"]["labels"] == {"site": "b"}
    # It never ran anywhere, and the others never ran on the daemon that does not match.
    assert not [e for e in await store.events.read("nowhere") if e.type in ("Started", "Adopted")]
    assert not (await store.agents.status("nowhere")).get("owner")
    assert await store.leases.read(["nowhere"]) == {}
    for name, daemon in (("on-b", "d-b"), ("uses-local-a", "d-a")):
        starts = [e for e in await store.events.read(name) if e.type in ("Started", "Adopted")]
        assert starts
        assert {e.daemon for e in starts} == {daemon}, starts


@pytest.mark.redis_tiers
async def test_a_respec_or_a_moved_model_hands_a_held_agent_to_a_daemon_that_matches(
    store: Store,
) -> None:
    await apply(
        store,
        _model_doc("local-m", "a"),
        agent_doc("mover", ECHO, **_placed("b")),
        agent_doc("follows-model", ECHO, model="local-m", **INBOX),
    )
    async with (
        running_daemon(store, daemon_id="d-a", labels={"site": "a"}),
        running_daemon(store, daemon_id="d-b", labels={"site": "b"}),
    ):
        await wait_until(lambda: _owned_by(store, "mover", "d-b"), what="mover on d-b")
        await wait_until(lambda: _owned_by(store, "follows-model", "d-a"), what="model user on a")
        await apply(store, agent_doc("mover", ECHO, **_placed("a")))
        await apply(store, _model_doc("local-m", "b"))
        await wait_until(lambda: _owned_by(store, "mover", "d-a"), what="mover to move to d-a")
        await wait_until(
            lambda: _owned_by(store, "follows-model", "d-b"), what="the model's user to follow it"
        )
        for name, left in (("mover", "d-b"), ("follows-model", "d-a")):
            events = [e for e in await store.events.read(name) if e.type == "Unhostable"]
            assert events
            assert events[-1].daemon == left, events
            assert "may not host the agent" in events[-1].message


@pytest.mark.redis_tiers
async def test_agents_pinned_to_one_daemon_all_run_there_past_its_fair_share(
    store: Store,
) -> None:
    pinned_names = [f"pin-{i}" for i in range(8)]
    free = [f"free-{i}" for i in range(4)]
    async with (
        running_daemon(store, daemon_id="d-a", labels={"site": "a"}) as da,
        running_daemon(store, daemon_id="d-b", labels={"site": "b"}) as db,
    ):
        await _both_see_each_other(da, db)
        await apply(
            store,
            *(agent_doc(n, ECHO, **_placed("b")) for n in pinned_names),
            *(agent_doc(n, ECHO, **INBOX) for n in free),
        )
        everyone = pinned_names + free
        # Balanced over both, b's limit would leave one pinned agent with no room.
        assert len(pinned_names) > share_limit(len(everyone), 2)

        async def all_held() -> dict[str, str] | None:
            leases = await store.leases.read(everyone)
            owners = {n: leases[n].owner for n in leases}
            return owners if len(owners) == len(everyone) else None

        owners = await wait_until(all_held, what="every agent to be held")
        assert {owners[n] for n in pinned_names} == {"d-b"}
        assert db._pinned_held() >= set(pinned_names)
        assert not da._pinned_held()
    for name in pinned_names:
        stops = [e for e in await store.events.read(name) if e.reason == "rebalance"]
        assert not stops, stops


def test_needs_compare_by_value() -> None:
    assert Needs((("site", "b"),), ("default",)) == needs_of(_agent(**_placed("b")).spec)
