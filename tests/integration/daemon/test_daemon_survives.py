"""The daemon survives everything but its own shutdown: faults of its loops and activation
paths are reported and retried, never the end of ``Daemon.run``; ids are valid and unique;
liveness never compares two hosts' clocks."""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import pytest

from agentos.client import Client
from agentos.daemon import Daemon, DaemonIdInUse
from agentos.engine import SimEngine
from agentos.runtime.runner import AgentRunner
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreUnavailable
from tests.helpers import FAST, agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = [pytest.mark.anyio]

ECHO = "tests.fixture_agents:Echo"
INBOX = {"triggers": [{"inbox": {}}]}


@pytest.mark.parametrize(
    "daemon_id", ["a{b}", "tab\there", "new\nline", "x" * 101, "", "-lead", "d|1", "é"]
)
def test_a_daemon_id_that_would_break_keys_or_logs_is_refused(daemon_id: str) -> None:
    with pytest.raises(ValueError, match="invalid daemon id"):
        DaemonSettings(daemon_id=daemon_id)


def test_valid_daemon_ids_and_the_default_pass() -> None:
    for daemon_id in ("d0", "host-1.example.org-123-abcdef", "pod@ns:1", "a_b"):
        assert DaemonSettings(daemon_id=daemon_id).daemon_id == daemon_id
    assert DaemonSettings().daemon_id


async def test_a_second_daemon_with_a_live_daemons_id_is_refused(store: Store) -> None:
    async with running_daemon(store, daemon_id="same") as first:
        await wait_until(lambda: _listed(store, "same", first.instance))
        second = Daemon(store, SimEngine(), DaemonSettings(**{**FAST, "daemon_id": "same"}))
        with anyio.fail_after(10), pytest.raises(DaemonIdInUse, match="'same' is in use"):
            await second.run()
        # The first one is untouched: still listed, as itself.
        assert await _listed(store, "same", first.instance)


async def test_a_dead_daemons_id_can_be_used_again_at_once(store: Store) -> None:
    async with running_daemon(store, daemon_id="reused"):
        pass
    async with running_daemon(store, daemon_id="reused") as d:
        await wait_until(lambda: _listed(store, "reused", d.instance))


async def _listed(store: Store, daemon_id: str, instance: str) -> bool:
    return (await store.heartbeats.daemons()).get(daemon_id, {}).get("instance") == instance


async def test_liveness_uses_the_servers_clock_not_a_hosts(store: Store) -> None:
    # One host's clock an hour ahead: before, it took every other daemon for dead (and
    # recovered their agents); the others took it for alive an hour after it died.
    skewed = {**FAST, "daemon_id": "ahead"}
    d_ahead = Daemon(store, SimEngine(), DaemonSettings(**skewed), clock=lambda: time.time() + 3600)
    async with running_daemon(store, daemon_id="on-time") as d, anyio.create_task_group() as tg:
        tg.start_soon(d_ahead.run)
        try:
            await wait_until(lambda: _sees(d_ahead, "on-time"), within=10)
            await wait_until(lambda: _sees(d, "ahead"), within=10)
            seen = (await store.heartbeats.daemons())["ahead"]["seen_at"]
            assert abs(seen - await store.heartbeats.server_time()) < 60
        finally:
            d_ahead.request_stop()


async def _sees(d: Daemon, other: str) -> bool:
    d._kicked = True
    d._kick.set()
    return other in d._live and d._peers == 2


async def test_an_oserror_while_starting_a_model_does_not_end_the_daemon(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply(store, agent_doc("echo", ECHO, **INBOX))
    calls = 0

    async def full_disk(self: Any, agent: str, model: str, *, allow_fallback: bool) -> Any:
        nonlocal calls
        calls += 1
        raise OSError(28, "No space left on device")

    from agentos.runtime.models import ModelPool

    real = ModelPool.for_agent
    monkeypatch.setattr(ModelPool, "for_agent", full_disk)
    async with running_daemon(store) as d:
        await wait_until(lambda: _fleet_event(store, "ModelUnavailable"), within=10)
        assert not d.stopping
        monkeypatch.setattr(ModelPool, "for_agent", real)  # the disk has room again
        await Client(store).send("echo", "hi")
        await wait_until(lambda: status_is(store, "echo", tasks_succeeded="1"), within=20)
    assert calls >= 1


async def _fleet_event(store: Store, type_: str) -> bool:
    return any(e.type == type_ for e in await store.events.read(None, count=100))


async def test_a_redis_blip_during_a_respec_restart_delays_it_and_does_not_end_the_daemon(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply(store, agent_doc("echo", ECHO, **INBOX))
    async with running_daemon(store) as d:
        await wait_until(lambda: status_is(store, "echo", phase="Idle"), within=10)
        before = (await store.agents.status("echo"))["spec_hash"]
        real = d._start_many
        blips = 0

        async def blip(wanted: Any, claims: Any = None) -> None:
            nonlocal blips
            if blips < 2:
                blips += 1
                raise StoreUnavailable("Redis at redis://x is away (test)")
            await real(wanted, claims)

        monkeypatch.setattr(d, "_start_many", blip)
        await apply(store, agent_doc("echo", ECHO, priority=60, **INBOX))
        await wait_until(lambda: _hash_changed(store, "echo", before), within=15)
        await Client(store).send("echo", "after the respec")
        await wait_until(lambda: status_is(store, "echo", tasks_succeeded="1"), within=15)
        assert blips == 2
        assert not d.stopping


async def _hash_changed(store: Store, name: str, before: str) -> bool:
    return (await store.agents.status(name)).get("spec_hash") not in (None, before)


async def test_an_unexpected_runner_error_backs_off_like_a_crash(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply(store, agent_doc("echo", ECHO, **INBOX))

    async def broken(self: AgentRunner) -> None:
        raise RuntimeError("a bug in the runtime")

    monkeypatch.setattr(AgentRunner, "_catch_up", broken)  # fails as it starts, every time
    async with running_daemon(store):
        await wait_until(lambda: _count(store, "echo", "RunnerError", 3), within=20)
    events = [e for e in await store.events.read("echo", count=200) if e.type == "RunnerError"]
    assert "a bug in the runtime" in events[0].message
    assert "activated again in 1s" in events[0].message
    assert "activated again in 2s" in events[1].message
    # Each activation waited out its backoff (a hot loop restarted it at once).
    gaps = [b.time - a.time for a, b in itertools.pairwise(events)]
    assert gaps[0] >= 0.9
    assert gaps[1] >= 1.8


async def _count(store: Store, name: str, type_: str, at_least: int) -> int:
    n = sum(1 for e in await store.events.read(name, count=200) if e.type == type_)
    return n if n >= at_least else 0
