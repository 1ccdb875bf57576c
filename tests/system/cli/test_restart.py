"""Code reload and restarts: an edited module applied again runs without a daemon restart;
code that no longer imports leaves the old code running; `agentos restart` and `rollout
restart` never cut a task short."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest

from agentos.client import Client
from agentos.core.spec import Document, SpecError, load_paths, parse_text
from agentos.store import Store
from tests.cli_support import cli, show, spawn
from tests.fixture_agents import GATES
from tests.helpers import agent_doc, apply, running_daemon, wait_until

pytestmark = [pytest.mark.anyio]

INBOX = [{"inbox": {}}]

AGENT = """
import agentos


class Greeter(agentos.Agent):
    async def act(self, ctx, message):
        return "{word} " + message.body
"""


def _write_agent(folder: Path, word: str, *, module: str) -> Path:
    (folder / f"{module}.py").write_text(AGENT.replace("{word}", word))
    spec = folder / "agent.yaml"
    spec.write_text(
        "apiVersion: agentos/v1\nkind: Agent\nmetadata: {name: greeter}\n"
        f"spec:\n  entrypoint: {module}:Greeter\n  triggers: [{{inbox: {{}}}}]\n"
    )
    return spec


async def _ask(client: Client, body: str) -> str:
    sent = await client.send("greeter", body)
    return (await client.wait_task("greeter", f"m-{sent}", timeout_s=20))["result"]


async def test_an_edited_module_is_loaded_after_apply_without_a_daemon_restart(
    store: Store, tmp_path: Path
) -> None:
    folder = tmp_path / "greeter"  # its own folder, not on the daemon's path
    folder.mkdir()
    module = f"greeter_{uuid.uuid4().hex[:8]}"
    spec = _write_agent(folder, "hello", module=module)
    client = Client(store)
    (created,) = await client.apply(load_paths([spec]))
    assert created.action == "created"
    stored = (await store.specs.agents_of(["greeter"]))["greeter"]["spec"]
    assert stored["codePath"] == str(folder.resolve())
    async with running_daemon(store) as daemon:
        assert await _ask(client, "ada") == "hello ada"
        _write_agent(folder, "bonjour", module=module)
        (changed,) = await client.apply(load_paths([spec]))
        assert (changed.action, changed.fields) == ("configured", ("spec.codeHash",))
        await wait_until(
            lambda: _restarted_with(daemon, "greeter", changed_hash(stored)), what="respec"
        )
        assert await _ask(client, "ada") == "bonjour ada"
        # New code that does not import: the old code keeps running, an event says why.
        (folder / f"{module}.py").write_text("def broken(:\n")
        await client.apply(load_paths([spec]))
        events = await wait_until(lambda: _events_of(store, "CodeReloadFailed"), within=20)
        assert "SyntaxError" in events[0].message
        assert "previous code keeps running" in events[0].message
        assert await _ask(client, "ada") == "bonjour ada"
        assert (await store.agents.status("greeter"))["phase"] != "Failed"
    unchanged = await client.apply(load_paths([spec]))
    assert unchanged[0].action == "unchanged"


def changed_hash(stored: dict[str, object]) -> object:
    return stored["codeHash"]


async def _restarted_with(daemon: object, name: str, old_hash: object) -> bool:
    runner = daemon.runners.get(name)  # type: ignore[attr-defined]
    return runner is not None and runner.resource.spec.code_hash != old_hash


async def _events_of(store: Store, type_: str) -> list[object]:
    return [e for e in await store.events.read("greeter") if e.type == type_]


async def test_a_code_path_without_the_module_is_refused_at_apply(tmp_path: Path) -> None:
    spec = tmp_path / "agent.yaml"
    spec.write_text(
        "apiVersion: agentos/v1\nkind: Agent\nmetadata: {name: lost}\n"
        "spec:\n  entrypoint: lost:Agent\n  codePath: code\n"
    )
    from agentos.core.code import with_code as _with_code

    with pytest.raises(SpecError) as caught:
        _with_code(load_paths([spec]))
    message = str(caught.value)
    assert f"{spec}:6" in message
    assert str(tmp_path / "code" / "lost.py") in message


async def test_restart_waits_for_the_running_task_and_never_cuts_it(store: Store) -> None:
    GATES.clear()
    await apply(store, agent_doc("gated", "tests.fixture_agents:Gated", triggers=INBOX))
    client = Client(store)
    sent = await client.send("gated", "gate:slow")
    async with running_daemon(store):
        await wait_until(lambda: _task_is(store, "gated", f"m-{sent}", "running"))
        mark = await client.restart("gated")
        assert mark is not None
        assert not await client.restarted("gated", mark)
        GATES["slow"].set()
        await wait_until(lambda: client.restarted("gated", mark), within=20, what="restart")
        record = await store.tasks.get("gated", f"m-{sent}")
        assert (record["status"], record["result"]) == ("succeeded", "gate:slow")
        # The restart came after the task ended: it waited, it did not cut it.
        events = [e for e in await store.events.read("gated") if e.type in ("Restarted", "Stopped")]
        assert [e.type for e in events] == ["Restarted"], events
        assert events[0].time >= float(record["finished_at"])
        after = await client.send("gated", "after")
        assert (await client.wait_task("gated", f"m-{after}", timeout_s=20))["result"] == "after"


def _labelled(name: str, team: str) -> Document:
    body = {
        "apiVersion": "agentos/v1",
        "kind": "Agent",
        "metadata": {"name": name, "labels": {"team": team}},
        "spec": {"entrypoint": "tests.fixture_agents:Echo", "triggers": INBOX},
    }
    (doc,) = parse_text(json.dumps(body), source=f"<{name}>")
    return doc


async def _task_is(store: Store, name: str, task: str, status: str) -> bool:
    return (await store.tasks.get(name, task)).get("status") == status


async def test_cli_restart_and_rollout_restart(store: Store, env: dict[str, str]) -> None:
    names = [f"echo-{i}" for i in range(5)]
    await apply(store, *(_labelled(n, "a" if i < 4 else "b") for i, n in enumerate(names)))
    client = Client(store)
    async with running_daemon(store):
        for n in names:
            sent = await client.send(n, "hi")
            await client.wait_task(n, f"m-{sent}", timeout_s=20)
        one = await cli(env, "restart", "echo-0")
        assert one.returncode == 0, show(one)
        assert one.stdout.strip() == "agent/echo-0 restarted", show(one)
        rollout = await cli(env, "rollout", "restart", "-l", "team=a", "--batch", "2")
        assert rollout.returncode == 0, show(rollout)
        lines = rollout.stdout.splitlines()
        assert lines[0] == "wave 1/2: 2/2 done", show(rollout)
        assert "wave 2/2: 2/2 done" in lines, show(rollout)
        assert lines[-1] == "rollout restarted 4 agent(s)", show(rollout)
        as_json = await cli(env, "restart", "-l", "team=b", "-o", "json")
        assert as_json.returncode == 0, show(as_json)
        assert '"outcome": "restarted"' in as_json.stdout, show(as_json)
        for args in (
            ("restart", "ghost"),
            ("restart",),
            ("restart", "-l", "team"),
            ("restart", "-l", "team=none"),
            ("restart", "echo-1", "--grace", "soon"),
            ("rollout", "restart", "-l", "=x"),
        ):
            bad = await cli(env, *args)
            assert bad.returncode == 2, show(bad)
            assert bad.stderr.count("\n") == 1, show(bad)
    restarted = [e for e in await store.events.read("echo-1") if e.type == "Restarted"]
    assert len(restarted) == 1


async def test_ps_watch_prints_an_agent_again_when_it_changes(
    store: Store,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    GATES.clear()
    await apply(store, agent_doc("gated", "tests.fixture_agents:Gated", triggers=INBOX))
    client = Client(store)
    log = tmp_path / "watch.log"
    with spawn(env, log, "ps", "--watch"):
        await wait_until(lambda: _has(log, "gated"), what="the first table")
        async with running_daemon(store):
            sent = await client.send("gated", "gate:w")
            await wait_until(lambda: _has(log, "gated  Running"), what="a Running line")
            GATES["w"].set()
            await client.wait_task("gated", f"m-{sent}", timeout_s=20)
            await wait_until(lambda: _has(log, "gated  Idle  0  1"), what="an Idle line")
    assert log.read_text().splitlines()[0].split()[:2] == ["NAME", "PHASE"]


async def _has(path: Path, text: str) -> bool:
    return text in await anyio.Path(path).read_text()


async def test_agent_names_complete_from_the_fleet(store: Store, env: dict[str, str]) -> None:
    await apply(store, *(_labelled(n, "a") for n in ("alpha", "alps", "beta")))
    script = Path(sys.executable).parent / "agentos"

    def complete(words: str, fleet: dict[str, str] = env) -> tuple[list[str], str]:
        proc = subprocess.run(
            [str(script)],
            env={
                **fleet,
                "_AGENTOS_COMPLETE": "complete_bash",
                "COMP_WORDS": words,
                "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout.split(), proc.stderr

    for words, names in (
        ("agentos describe agent al", ["alpha", "alps"]),
        ("agentos logs b", ["beta"]),
        ("agentos restart ", ["alpha", "alps", "beta"]),
    ):
        assert await anyio.to_thread.run_sync(complete, words) == (names, ""), words
    # A fleet out of reach completes nothing, and prints no error into the shell.
    unreachable = {**env, "AGENTOS_REDIS_URL": "redis://127.0.0.1:1/0"}
    got = await anyio.to_thread.run_sync(complete, "agentos logs b", unreachable)
    assert got == ([], "")


async def test_delete_agent_by_selector_or_names_all_or_nothing(
    store: Store,
    env: dict[str, str],
) -> None:
    await apply(store, _labelled("a1", "a"), _labelled("a2", "a"), _labelled("b1", "b"))
    partly = await cli(env, "delete", "agent", "b1", "ghost")
    assert partly.returncode == 1, show(partly)
    assert 'agent "ghost" not found' in partly.stderr, show(partly)
    assert sorted(await store.specs.agents()) == ["a1", "a2", "b1"]  # none deleted
    for args in (("delete", "agent"), ("delete", "agent", "a1", "-l", "team=a")):
        usage = await cli(env, *args)
        assert usage.returncode == 2, show(usage)
    gone = await cli(env, "delete", "agent", "-l", "team=a")
    assert gone.returncode == 0, show(gone)
    assert gone.stdout.splitlines() == ["agent/a1 deleted", "agent/a2 deleted"]
    assert sorted(await store.specs.agents()) == ["b1"]
    nobody = await cli(env, "delete", "agent", "-l", "team=z")
    assert nobody.returncode == 2, show(nobody)


def test_two_folders_with_the_same_module_name_load_their_own_code(tmp_path: Path) -> None:
    from agentos.core.code import code_identity
    from agentos.runtime.loop import load_agent_class

    module = f"agent_{uuid.uuid4().hex[:8]}"
    loaded = {}
    for word in ("one", "two", "one"):
        folder = tmp_path / word
        folder.mkdir(exist_ok=True)
        spec = _write_agent(folder, word, module=module)
        path, digest = code_identity(f"{module}:Greeter", str(spec), None)
        assert path == str(folder.resolve())
        cls, error = load_agent_class(f"{module}:Greeter", code_path=path, code_hash=digest)
        assert error is None
        loaded.setdefault(word, cls)
        assert cls is loaded[word]  # the same class again for the same folder and hash
    assert loaded["one"] is not loaded["two"]


def test_a_package_entrypoint_reloads_with_its_submodules(tmp_path: Path) -> None:
    from agentos.core.code import code_identity
    from agentos.runtime.loop import load_agent_class

    package = f"pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("from .impl import Greeter\n")
    spec = tmp_path / "agent.yaml"
    spec.write_text("kind: Agent\n")

    def version(word: str) -> type:
        (root / "impl.py").write_text(AGENT.replace("{word}", word))
        path, digest = code_identity(f"{package}:Greeter", str(spec), None)
        cls, error = load_agent_class(f"{package}:Greeter", code_path=path, code_hash=digest)
        assert error is None
        return cls

    first, second = version("v1"), version("v2")
    assert first is not second  # an edited submodule changes the hash and is loaded anew
    assert second.__module__ == f"{package}.impl"
    assert "v2" in (root / "impl.py").read_text()
