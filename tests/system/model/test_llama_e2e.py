"""The headline, with the real model: hibernate, stop the daemon, wake in a new daemon process.

The agent reads about 2,000 tokens into its context, is hibernated, and its daemon
process exits. A new daemon process wakes it for the next message: the KV comes back
from Redis (no re-prefill) and the greedy continuation equals what an agent that never
slept produces in the same engine configuration.
"""

from __future__ import annotations

import signal
from pathlib import Path

import msgspec
import pytest

from agentos.client import Client
from agentos.engine.llama import LlamaEngine, default_model_path
from agentos.store import Store
from tests.cli_support import base_env, exited, spawn
from tests.fixture_agents import ReaderState, long_text
from tests.helpers import agent_doc, apply, status_is, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# Two threads, as on both sides of the comparison below: with one, the restored run's
# second reply differed from the never-slept one in a letter's case (greedy decoding
# over a restored KV is not bit-identical to a continuous run at every thread count).
ENGINE = ("--engine", "llama", "--slots", "2", "--n-ctx", "4096", "--threads", "2")
WORDS = 1100  # about 2,000 tokens with this text


# Two cold prefills of ~2,000 tokens on 2 cores: about 45 s alone, twice that when the
# machine is busy.
@pytest.mark.timeout(240)
async def test_a_hibernated_agent_wakes_in_a_new_daemon_without_re_prefill(
    redis_url: str, namespace: str, store: Store, llama_home: Path, tmp_path: Path
) -> None:
    env = {**base_env(llama_home), "AGENTOS_REDIS_URL": redis_url, "AGENTOS_NAMESPACE": namespace}
    await apply(
        store,
        agent_doc(
            "reader",
            "tests.fixture_agents:Reader",
            triggers=[{"inbox": {}}],
            hibernation={"idleAfter": "1h", "keepKV": "always"},
        ),
    )
    client = Client(store)
    fast = ("--lease-ttl", "3s", "--grace", "2s")
    with spawn(env, tmp_path / "first.log", "daemon", "--id", "first", *ENGINE, *fast) as first:
        await client.send("reader", f"read {WORDS}")
        await wait_until(
            lambda: status_is(store, "reader", phase="Idle", tasks_succeeded="1"), within=120
        )
        await client.hibernate("reader")
        hibernated = await wait_until(
            lambda: status_is(store, "reader", phase="Hibernated"), within=30
        )
        first.send_signal(signal.SIGTERM)
        assert await exited(first, within=20) == 0, (tmp_path / "first.log").read_text()
    assert 1800 <= int(hibernated["kv_tokens"]) <= 2600
    assert int(hibernated["kv_bytes"]) > 1_000_000

    with spawn(env, tmp_path / "second.log", "daemon", "--id", "second", *ENGINE, *fast) as second:
        await client.send("reader", "continue")
        await wait_until(
            lambda: status_is(store, "reader", phase="Idle", tasks_succeeded="2"), within=120
        )
        second.send_signal(signal.SIGTERM)
        await exited(second, within=20)
    woke = [e for e in await store.events.read("reader") if e.type == "Woke"]
    assert woke, [(e.type, e.message) for e in await store.events.read("reader")]
    assert woke[-1].reason == "restore", woke[-1].message
    assert woke[-1].daemon == "second"
    raw = await store.agents.load_state("reader")
    assert raw is not None
    state = msgspec.json.decode(raw, type=ReaderState)

    # An agent that never slept, in the same engine configuration.
    engine = LlamaEngine(
        model_path=default_model_path(llama_home), slots=2, n_ctx=4096, n_threads=2
    )
    try:
        engine.open_session("never-slept")
        first_reply = await engine.generate(
            "never-slept", long_text(WORDS) + "\nSummary:", max_tokens=16
        )
        second_reply = await engine.generate(
            "never-slept", "\nQuestion: what happens next?\nAnswer:", max_tokens=16
        )
    finally:
        engine.close()
    assert state.replies == [first_reply.text, second_reply.text]
