"""The llamaserver engine on a real llama.cpp server (xllamacpp) with the Gemma model.

Two slots and a small context keep it fast. Assertions are on the server's cache
counters (``timings.cache_n``), never on generated text: greedy text after a cached path
is not bit-identical to a cold run (FACTS).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

pytest.importorskip("xllamacpp")

from agentos.client import Client
from agentos.engine import KVSnapshot
from agentos.engine.gguf import default_model_path
from agentos.engine.llamaserver import EmbeddedServer, LlamaServerEngine
from agentos.store import Store
from tests.fixture_models import CallLog
from tests.helpers import agent_doc, apply, policy_doc, running_daemon, status_is, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

N_CTX = 1024  # two slots of 512 tokens
PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def server(llama_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One embedded server shared by the engine-level tests of this module."""
    folder = tmp_path_factory.mktemp("llamaserver")
    s = EmbeddedServer(
        model_path=default_model_path(llama_home),
        slot_dir=folder / "slots",
        n_ctx=N_CTX,
        n_parallel=2,
        n_threads=2,
    )
    yield s
    s.stop()


def _remote(server: EmbeddedServer, **options: Any) -> LlamaServerEngine:
    endpoint = {"url": server.url, "max_concurrent": 2, "slot_dir": str(server.slot_dir)}
    return LlamaServerEngine(endpoints=[endpoint], **options)


def _metrics(server: EmbeddedServer) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            out[name.removeprefix("llamacpp:")] = float(value)
    return out


def _model_doc(name: str, **spec: Any) -> Any:
    return policy_doc(
        {"apiVersion": "agentos/v1", "kind": "Model", "metadata": {"name": name}, "spec": spec}
    )


async def test_restore_into_another_slot_reuses_the_saved_tokens(server: EmbeddedServer) -> None:
    engine = _remote(server)
    try:
        engine.open_session("a")
        await engine.generate("a", PROMPT, max_tokens=4)
        snapshot = await engine.export_kv("a")
        assert snapshot.data is not None
        assert snapshot.n_kv is not None
        assert not list(server.slot_dir.iterdir())  # the file went into the snapshot
        slot = engine._sessions["a"].slot
        engine.close_session("a")
        engine.open_session("squatter")  # takes the slot "a" had
        engine.open_session("a")
        assert engine._sessions["a"].slot != slot
        assert await engine.import_kv("a", snapshot)
        again = await engine.generate("a", "\nQ: And of Spain?\nA:", max_tokens=2)
        assert snapshot.n_kv - 2 <= again.cached_tokens <= snapshot.n_kv
        assert engine.stats.last_restore_check == (snapshot.n_kv, again.cached_tokens)
    finally:
        await engine.aclose()


async def test_a_corrupt_or_foreign_slot_file_falls_back_to_re_prefill(
    server: EmbeddedServer,
) -> None:
    engine = _remote(server)
    try:
        engine.open_session("a")
        await engine.generate("a", PROMPT, max_tokens=2)
        good = await engine.export_kv("a")
        await engine.reset_session("a")
        assert good.data is not None
        corrupt = KVSnapshot(good.fingerprint, good.tokens, b"\0garbage" * 64, good.n_kv)
        assert await engine.import_kv("a", corrupt) is False
        foreign = KVSnapshot("llamaserver/another-build", good.tokens, good.data, good.n_kv)
        assert await engine.import_kv("a", foreign) is False
        assert engine.stats.restore_failures == 1
        await engine.prefill("a", good.tokens)  # what the hibernator does next
        again = await engine.generate("a", "\nQ: Spain?\nA:", max_tokens=2)
        assert again.cached_tokens >= len(good.tokens) - 2
    finally:
        await engine.aclose()


async def test_remote_without_a_slot_dir_keeps_the_history_only(server: EmbeddedServer) -> None:
    engine = LlamaServerEngine(endpoints=[{"url": server.url}])
    try:
        assert not engine.kv_hibernation
        engine.open_session("a")
        await engine.generate("a", PROMPT, max_tokens=2)
        snapshot = await engine.export_kv("a")
        assert snapshot.data is None
        assert len(snapshot.tokens) > 10
    finally:
        await engine.aclose()


async def test_hibernated_in_one_daemon_woken_in_another_with_its_kv(
    store: Store, llama_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTOS_HOME", str(tmp_path))
    model = _model_doc(
        "local",
        engine="llamaserver",
        modelPath=str(default_model_path(llama_home)),
        slots=2,
        contextLength=512,
    )
    agent = agent_doc(
        "chatter",
        "tests.fixture_models:Chatter",
        model="local",
        triggers=[{"inbox": {}}],
        hibernation={"idleAfter": "1h", "keepKV": "always"},
    )
    await apply(store, model, agent)
    client = Client(store)
    async with running_daemon(store, daemon_id="first") as first:
        await client.send("chatter", PROMPT)
        await wait_until(lambda: status_is(store, "chatter", tasks_succeeded="1"), within=90)
        await client.hibernate("chatter")
        hibernated = await wait_until(
            lambda: status_is(store, "chatter", phase="Hibernated"), within=30
        )
        server_one = first.models.get("local")
        assert server_one is not None
    assert int(hibernated["kv_kept"]) == 1
    saved = int(hibernated["kv_tokens"])
    async with running_daemon(store, daemon_id="second") as second:
        await client.send("chatter", "\nQ: And of Spain?\nA:")
        await wait_until(lambda: status_is(store, "chatter", tasks_succeeded="2"), within=90)
        entry = second.models.get("local")
        assert entry is not None
        assert entry.engine is not server_one.engine
    woke = [e for e in await store.events.read("chatter") if e.type == "Woke"]
    assert woke
    assert woke[-1].reason == "restore", [
        (e.type, e.message) for e in await store.events.read("chatter")
    ]
    assert woke[-1].daemon == "second"
    raw = await store.agents.load_state("chatter")
    assert raw is not None
    log = msgspec.json.decode(raw, type=CallLog)
    assert saved - 3 <= log.cached[1] <= saved, (saved, log)


async def test_server_killed_mid_call_retries_the_task(
    store: Store, llama_home: Path, tmp_path: Path
) -> None:
    def start(port: int | None = None) -> EmbeddedServer:
        return EmbeddedServer(
            model_path=default_model_path(llama_home),
            slot_dir=tmp_path / "slots",
            n_ctx=N_CTX,
            n_parallel=2,
            n_threads=2,
            port=port,
        )

    doomed = start()
    port = doomed.port
    model = _model_doc(
        "remote-llama",
        engine="llamaserver",
        endpoints=[{"url": doomed.url, "maxConcurrent": 2}],
        timeouts={"connect": "1s"},
    )
    agent = agent_doc(
        "chatter",
        "tests.fixture_models:Chatter",
        model="remote-llama",
        triggers=[{"inbox": {}}],
        config={"maxTokens": 48},
    )
    await apply(store, model, agent)
    revived: EmbeddedServer | None = None
    try:
        async with running_daemon(store):
            await Client(store).send("chatter", PROMPT)

            async def generating() -> bool:
                try:
                    return _metrics(doomed).get("requests_processing", 0) >= 1
                except httpx.HTTPError:
                    return False

            await wait_until(generating, within=60, what="a call in flight")
            doomed.process.send_signal(signal.SIGKILL)
            doomed.stop()
            await wait_until(
                lambda: _event(store, "chatter", "InfrastructureError"),
                within=30,
                what="the task parked as an infrastructure error",
            )
            revived = start(port)
            await wait_until(lambda: status_is(store, "chatter", tasks_succeeded="1"), within=120)
        status = await store.agents.status("chatter")
        assert status.get("restarts", "0") == "0"
        assert status.get("consecutive_failures", "0") == "0"
    finally:
        if revived is not None:
            revived.stop()


async def test_usage_by_model_equals_the_servers_own_counts(
    store: Store, server: EmbeddedServer
) -> None:
    before = _metrics(server)
    model = _model_doc(
        "metered",
        engine="llamaserver",
        endpoints=[{"url": server.url, "maxConcurrent": 2, "slotDir": str(server.slot_dir)}],
        prices={"input": 1.0, "cachedInput": 0.1, "output": 2.0},
    )
    agent = agent_doc(
        "chatter", "tests.fixture_models:Chatter", model="metered", triggers=[{"inbox": {}}]
    )
    await apply(store, model, agent)
    client = Client(store)
    async with running_daemon(store, metering_flush_s=0.1):
        await client.send("chatter", PROMPT)
        await client.send("chatter", "\nQ: And of Spain?\nA:")
        await wait_until(lambda: status_is(store, "chatter", tasks_succeeded="2"), within=90)
    after = _metrics(server)
    (row,) = [r for r in await client.usage_by_model() if r.model == "metered"]
    assert row.calls == 2
    assert row.tokens_in == after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert row.tokens_cached == (
        after["prompt_tokens_cached_total"] - before["prompt_tokens_cached_total"]
    )
    assert row.tokens_out == after["tokens_predicted_total"] - before["tokens_predicted_total"]
    assert row.cost == pytest.approx(
        (row.tokens_in * 1.0 + row.tokens_cached * 0.1 + row.tokens_out * 2.0) / 1000
    )
    assert json.dumps(row.to_dict())


async def _event(store: Store, name: str, kind: str) -> bool:
    return any(e.type == kind for e in await store.events.read(name))
