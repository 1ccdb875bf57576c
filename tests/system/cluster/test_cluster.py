"""Redis Cluster specifics: URLs that point at the wrong kind of server, broken clusters,
and the sharded streams read as one (cursors across shards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentos.store import Store
from agentos.store.keys import FEED_SHARDS, SIGNAL_SHARDS, Keys
from agentos.store.localcluster import LocalCluster
from agentos.store.streams import parse_cursor
from tests.cli_support import base_env, cli, show
from tests.conftest import is_cluster

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]


@pytest.fixture(scope="module")
def uncovered_cluster() -> Iterator[str]:
    with LocalCluster(masters=3, uncovered=10) as cluster:
        yield cluster.url


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1].split("/")[0]


async def _one_line_error(tmp_path: Path, url: str) -> str:
    proc = await cli(base_env(tmp_path / "home"), "--redis", url, "ps")
    assert proc.returncode == 1, show(proc)
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr
    return proc.stderr


async def test_a_url_of_the_wrong_kind_is_one_line_naming_it(
    redis_url: str, tmp_path: Path
) -> None:
    if is_cluster(redis_url):  # a plain URL to one cluster node
        wrong = f"redis://:s3cret@127.0.0.1:{_port(redis_url)}"
        message = await _one_line_error(tmp_path, wrong)
        assert "is a Redis Cluster node: use redis+cluster://" in message
    else:  # a cluster URL to a single server
        wrong = f"redis+cluster://:s3cret@127.0.0.1:{_port(redis_url)}"
        message = await _one_line_error(tmp_path, wrong)
        assert "is a single server, not a cluster" in message
    assert f"127.0.0.1:{_port(redis_url)}" in message
    assert ":***@" in message


async def test_a_cluster_that_is_down_or_missing_slots_is_refused(
    uncovered_cluster: str, tmp_path: Path
) -> None:
    message = await _one_line_error(tmp_path, "redis+cluster://u:s3cret@127.0.0.1:1")
    assert "cannot reach Redis Cluster at redis+cluster://u:***@127.0.0.1:1" in message
    message = await _one_line_error(tmp_path, uncovered_cluster)
    assert "does not serve every slot" in message
    assert uncovered_cluster in message


async def test_the_fleet_feed_reads_as_one_stream_across_its_shards(store: Store) -> None:
    agents = [f"a{i}" for i in range(40)]  # spread over the 16 feed shards
    assert len({store.keys.feed_shard(a) for a in agents}) > 8
    for i, agent in enumerate(agents):
        await store.events.record_fleet_event(agent, "Probe", "test", f"m{i}", "")
    newest = await store.events.read(None, count=10)
    assert [e.message for e in newest] == [f"m{i}" for i in range(30, 40)]
    # Resuming from the last event's id (a cursor over every shard) sees only newer ones.
    cursor = newest[-1].id
    assert len(parse_cursor(cursor, FEED_SHARDS)) == FEED_SHARDS
    assert await store.events.read(None, after_id=cursor, count=100) == []
    for i, agent in enumerate(agents[:5]):
        await store.events.record_fleet_event(agent, "Probe", "test", f"n{i}", "")
    later = await store.events.read(None, after_id=cursor, count=100, block_ms=100)
    assert [e.message for e in later] == [f"n{i}" for i in range(5)]
    # From an older event of the tail: what came after it, nothing twice.
    middle = newest[4]
    again = await store.events.read(None, after_id=middle.id, count=100)
    assert [e.message for e in again] == [f"m{i}" for i in range(35, 40)] + [
        f"n{i}" for i in range(5)
    ]


async def test_signals_of_every_shard_reach_a_reader_of_each_group(store: Store) -> None:
    groups = store.signals.groups()
    assert sum(len(g) for g in groups) == SIGNAL_SHARDS
    assert len(groups) == (SIGNAL_SHARDS if store.cluster else 1)
    start = {g: await store.signals.last_id(g) for g in groups}
    agents = [f"s{i}" for i in range(20)]
    for agent in agents:
        await store.signals.send("message", agent)
    seen = []
    for g in groups:
        seen += [f["agent"] for _, f in await store.signals.read(start[g], block_ms=10, group=g)]
    assert sorted(seen) == sorted(agents)


def test_every_fleet_stream_shard_is_its_own_hash_tag() -> None:
    keys = Keys("ns")
    tags = {k.split("{")[1].split("}")[0] for k in [*keys.feed_streams(), *keys.signal_streams()]}
    assert len(tags) == FEED_SHARDS + SIGNAL_SHARDS


async def test_a_cluster_with_a_password_works_and_a_wrong_one_is_refused(
    namespace: str, tmp_path: Path
) -> None:
    with LocalCluster(masters=3, password="s3cret") as cluster:
        store = await Store.connect(cluster.url, namespace=namespace)
        try:
            await store.signals.send("message", "x")
            assert await store.signals.read("0-0", block_ms=10)
            assert len(await store.command_calls()) > 0  # admin reads on every master
        finally:
            await store.drop_namespace()
            await store.close()
        wrong = cluster.url.replace(":s3cret@", ":wrong@")
        message = await _one_line_error(tmp_path, wrong)
        assert "refused the credentials" in message
        assert ":***@" in message
