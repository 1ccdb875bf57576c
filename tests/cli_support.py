"""Running the `agentos` command from tests: real subprocesses against a real Redis.

Every CLI and fleet test runs ``python -m agentos.cli`` from the repository root (so
that the ``tests.fixture_agents:...`` entrypoints import) with ``AGENTOS_*`` pointing at
the session's server and the test's own namespace (the ``env`` fixture).
These helpers live apart from the tests so that any test module, in any tier, can
start a daemon process without importing another test module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest

from agentos.store import Store
from tests.fixture_agents import EchoState
from tests.helpers import held_within

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 30.0


def base_env(home: Path) -> dict[str, str]:
    """The test process's environment without any AGENTOS_* setting, plus a home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTOS_")}
    for noisy in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(noisy, None)
    env.update(NO_COLOR="1", COLUMNS="200", PYTHONUNBUFFERED="1", AGENTOS_HOME=str(home))
    return env


@pytest.fixture
def env(redis_url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    """The environment of an `agentos` subprocess: this test's server and namespace."""
    return {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }


def _run_cli(
    args: Sequence[str], env: dict[str, str], timeout: float, stdin: str | None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentos.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def cli(
    env: dict[str, str], *args: str, limit_s: float = TIMEOUT_S, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``agentos ARGS`` to completion in a worker thread (killed after ``limit_s``)."""
    return await anyio.to_thread.run_sync(partial(_run_cli, list(args), env, limit_s, stdin))


def show(proc: subprocess.CompletedProcess[str]) -> str:
    """What to print when an assertion about ``proc`` fails."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@contextmanager
def spawn(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running ``agentos ARGS`` with output in ``log``; killed on exit if still up."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentos.cli", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


async def exited(proc: subprocess.Popen[bytes], within: float) -> int | None:
    """The exit code of ``proc`` once it exits, or None if it is still running after ``within``."""
    await held_within(lambda: proc.poll() is not None, within=within, every=0.05)
    return proc.poll()


def write(path: Path, text: str) -> Path:
    """Write ``text`` (dedented) to ``path``, creating its folders; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


async def echo_state(store: Store, name: str) -> EchoState | None:
    """An Echo agent's durable state (None before its first save)."""
    raw = await store.agents.load_state(name)
    return None if raw is None else msgspec.json.decode(raw, type=EchoState)
