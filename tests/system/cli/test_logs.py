"""Agents' logs: ctx.log lines (and the runtime's lines about an agent) reach its log in
Redis, `agentos logs` prints them escaped, `-f` follows them, `-l` selects by label."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agentos.client import Client
from agentos.core.spec import Document, parse_text
from agentos.runtime.agentlog import AgentLogHandler, attributed, current_task
from agentos.store import Store
from tests.cli_support import base_env, cli, show, spawn
from tests.helpers import apply, running_daemon, wait_until

pytestmark = [pytest.mark.anyio]

LOGGER = "tests.fixture_agents:Logger"


def labelled(name: str, app: str) -> Document:
    body = {
        "apiVersion": "agentos/v1",
        "kind": "Agent",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"entrypoint": LOGGER, "triggers": [{"inbox": {}}]},
    }
    (doc,) = parse_text(json.dumps(body), source=f"<{name}>")
    return doc


def test_the_handler_files_lines_under_the_agent_that_logged_them() -> None:
    handler = AgentLogHandler("d1")
    log = logging.getLogger("agentos.test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("nobody's")  # outside any agent: not kept
        with attributed("a1"):
            token = current_task.set("t-1")
            log.info("hello %s", "there")
            current_task.reset(token)
            log.debug("too fine")
        logging.LoggerAdapter(log, {"agent": "a2"}).warning("from ctx.log")
    finally:
        log.removeHandler(handler)
    batch = handler.take()
    assert list(batch) == ["a1", "a2"]
    (line,) = batch["a1"]
    assert (line["message"], line["level"], line["task"], line["daemon"]) == (
        "hello there",
        "INFO",
        "t-1",
        "d1",
    )
    assert batch["a2"][0]["message"] == "from ctx.log"
    assert handler.take() == {}


async def test_logs_prints_follows_and_selects(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    await apply(store, labelled("scribe", "notes"), labelled("other", "else"))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    client = Client(store)
    follow_log = tmp_path / "follow.log"
    async with running_daemon(store):
        with spawn(env, follow_log, "logs", "scribe", "-f") as follower:
            await client.send("scribe", "first \x1b[31mred")

            async def followed() -> bool:
                return "got 'first \\x1b[31mred'" in follow_log.read_text()

            await wait_until(followed, within=30, what="logs -f to print the line")
            await client.send("scribe", "warn me")

            async def second() -> bool:
                return "careful: warn me" in follow_log.read_text()

            await wait_until(second, within=30, what="logs -f to print the next line")
            assert follower.poll() is None
        await client.send("other", "elsewhere")

        async def both() -> bool:
            return bool(await store.logs.read("other"))

        await wait_until(both, within=30, what="the other agent's log")
    printed = await cli(env, "logs", "scribe")
    assert printed.returncode == 0, show(printed)
    lines = [ln for ln in printed.stdout.splitlines() if "scribe" in ln]
    assert any("INFO" in ln and "got 'first \\x1b[31mred'" in ln for ln in lines)
    assert "\x1b" not in printed.stdout
    as_json = await cli(env, "logs", "scribe", "-o", "json", "--tail", "1")
    assert as_json.returncode == 0, show(as_json)
    (last,) = [json.loads(ln) for ln in as_json.stdout.splitlines()]
    assert (last["agent"], last["level"], last["message"]) == (
        "scribe",
        "WARNING",
        "careful: warn me",
    )
    assert last["task"].startswith("m-")
    chosen = await cli(env, "logs", "-l", "app=else")
    assert chosen.returncode == 0, show(chosen)
    assert "elsewhere" in chosen.stdout
    assert "scribe" not in chosen.stdout
    recent = await cli(env, "logs", "scribe", "--since", "10m")
    assert recent.returncode == 0
    assert "warn me" in recent.stdout
    for bad, why in (
        (("logs", "nobody"), 'agent "nobody" not found'),
        (("logs", "-l", "app"), "-l: 'app' is not key=value"),
        (("logs", "scribe", "--since", "lately"), "--since"),
        (("logs",), "give an agent's NAME or -l"),
    ):
        result = await cli(env, *bad)
        assert result.returncode == 2, show(result)
        assert why in result.stderr


async def test_get_and_ps_take_names_singular_kinds_and_selectors(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    await apply(store, labelled("scribe", "notes"), labelled("other", "else"))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }

    async def names(*args: str) -> list[str]:
        result = await cli(env, *args, "-o", "json")
        assert result.returncode == 0, show(result)
        return [row["name"] for row in json.loads(result.stdout)]

    assert await names("get", "agent", "scribe") == ["scribe"]
    assert await names("get", "agents") == ["other", "scribe"]
    assert await names("get", "agents", "-l", "app=else") == ["other"]
    assert await names("ps", "-l", "app=notes") == ["scribe"]
    assert await names("get", "Agents", "scribe", "other", "-l", "app=notes") == ["scribe"]
    missing = await cli(env, "get", "agent", "nobody")
    assert missing.returncode == 1
    assert 'agent "nobody" not found' in missing.stderr
    described = await cli(env, "describe", "agent", "scribe")
    assert described.returncode == 0, show(described)
    text = described.stdout
    assert "Model:         default" in text
    assert "Labels:        app=notes" in text
    assert "Hibernation:   after 1m idle, KV auto" in text
    version = await cli(env, "--version")
    assert version.returncode == 0
    assert version.stdout.startswith("agentos ")
