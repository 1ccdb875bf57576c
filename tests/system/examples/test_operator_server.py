"""The operator example's MCP server on its own: a real subprocess, the bare ``mcp`` Client.

Over stdio for the tools, their path checks, the allow-list and the resource limits
of ``run``; once over Streamable HTTP on loopback. Side effects are counted in the
workspace's audit log, as the server writes it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, TextContent

from examples.operator.server import (
    AUDIT_LOG,
    DEFAULT_ALLOW,
    FILE_SIZE_LIMIT_BYTES,
    MAX_OUTPUT_BYTES,
    parse_args,
)
from tests.helpers import wait_until

pytestmark = [pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[3]
TOOLS = {"list_files", "read_file", "write_file", "run", "sleep", "touch_counter"}
CALL_S = 20.0


def server_args(workspace: Path, *extra: str) -> list[str]:
    return ["-m", "examples.operator.server", "--workspace", str(workspace), *extra]


@asynccontextmanager
async def connected(workspace: Path, *extra: str) -> AsyncIterator[Client]:
    """A Client to the server started as a child process over stdio."""
    params = StdioServerParameters(
        command=sys.executable, args=server_args(workspace, *extra), cwd=str(ROOT)
    )
    with anyio.fail_after(30):
        async with Client(params, read_timeout_seconds=CALL_S) as client:
            yield client


def text_of(result: CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


def audit(workspace: Path) -> list[str]:
    log = workspace / AUDIT_LOG
    return log.read_text().splitlines() if log.exists() else []


async def call(client: Client, tool: str, /, **arguments: object) -> CallToolResult:
    return await client.call_tool(tool, arguments)


# ----------------------------------------------------------------------------- settings


def test_the_workspace_comes_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    assert parse_args(["--workspace", "w"], environ={}).workspace == Path("w")
    from_env = parse_args([], environ={"OPERATOR_WORKSPACE": str(tmp_path)})
    assert from_env.workspace == tmp_path
    assert from_env.allow == DEFAULT_ALLOW
    assert from_env.port is None
    with pytest.raises(SystemExit):
        parse_args([], environ={})


def test_allow_replaces_the_list_and_http_takes_a_port() -> None:
    settings = parse_args(["--workspace", "w", "--allow", "sleep", "dd", "--http", "8123"], {})
    assert settings.allow == ("sleep", "dd")
    assert (settings.host, settings.port) == ("127.0.0.1", 8123)
    with pytest.raises(SystemExit):
        parse_args(["--workspace", "w", "--allow", "bin/ls"], {})


# ----------------------------------------------------------------------------- stdio


async def test_it_lists_its_tools(tmp_path: Path) -> None:
    async with connected(tmp_path / "ws") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    assert all(t.description for t in tools.values())
    assert "grep" in (tools["run"].description or "")
    assert (tmp_path / "ws").is_dir()  # created on start


async def test_write_list_read_round_trip_is_audited(tmp_path: Path) -> None:
    async with connected(tmp_path) as client:
        wrote = await call(client, "write_file", path="notes/a.txt", content="hello, world")
        assert not wrote.is_error
        assert text_of(wrote) == "wrote 12 bytes to notes/a.txt"
        top = await call(client, "list_files")
        assert top.structured_content == {"result": [AUDIT_LOG, "notes/"]}
        inside = await call(client, "list_files", path="notes")
        assert inside.structured_content == {"result": ["notes/a.txt"]}
        assert text_of(await call(client, "read_file", path="notes/a.txt")) == "hello, world"
        cut = text_of(await call(client, "read_file", path="notes/a.txt", max_bytes=5))
        assert cut.startswith("hello\n[... cut")
        missing = await call(client, "read_file", path="notes/b.txt")
        assert missing.is_error
        assert "No such file" in text_of(missing)
        await call(client, "write_file", path="notes/a.txt", content="again")
    assert (tmp_path / "notes" / "a.txt").read_text() == "again"
    assert audit(tmp_path) == ["write_file notes/a.txt"] * 2
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["a.txt"]  # no temp files left


async def test_paths_that_leave_the_workspace_are_refused(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (tmp_path / "secret.txt").write_text("not yours")
    (workspace / "out").symlink_to(tmp_path)
    async with connected(workspace) as client:
        for name, arguments in [
            ("read_file", {"path": "../secret.txt"}),
            ("read_file", {"path": str(tmp_path / "secret.txt")}),
            ("read_file", {"path": "out/secret.txt"}),
            ("list_files", {"path": ".."}),
            ("write_file", {"path": "out/new.txt", "content": "x"}),
            ("write_file", {"path": "a/../../new.txt", "content": "x"}),
            ("write_file", {"path": AUDIT_LOG, "content": "forged"}),
            ("touch_counter", {"name": "../x"}),
        ]:
            result = await client.call_tool(name, arguments)
            assert result.is_error, (name, arguments)
            assert "not yours" not in text_of(result)
        inside = await call(client, "list_files", path="sub/../.")
    assert inside.structured_content == {"result": ["out/"]}  # .. that stays inside is fine
    assert not (tmp_path / "new.txt").exists()
    assert audit(workspace) == []


async def test_run_starts_an_allowed_program_in_the_workspace(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    async with connected(tmp_path) as client:
        listed = await call(client, "run", command=["ls"])
        counted = await call(client, "run", command=["wc", "-l", "a.txt"])
        failed = await call(client, "run", command=["cat", "missing.txt"])
        big = await call(client, "run", command=["head", "-c", "100000", "/dev/zero"])
    assert listed.structured_content == {
        "exit_code": 0,
        "stdout": "a.txt\n",  # ls hides the audit log, a dotfile
        "stderr": "",
        "timed_out": False,
    }
    assert counted.structured_content is not None
    assert counted.structured_content["stdout"] == "2 a.txt\n"
    assert failed.structured_content is not None
    assert failed.structured_content["exit_code"] != 0
    assert "missing.txt" in failed.structured_content["stderr"]
    assert big.structured_content is not None
    assert big.structured_content["stdout"].startswith("\x00" * MAX_OUTPUT_BYTES + "\n[... cut")
    assert audit(tmp_path)[:2] == ['run ["ls"]', 'run ["wc", "-l", "a.txt"]']
    assert len(audit(tmp_path)) == 4


async def test_run_refuses_a_program_off_the_allow_list(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("keep me")
    async with connected(tmp_path) as client:
        refused = await call(client, "run", command=["rm", "a.txt"])
        by_path = await call(client, "run", command=["/bin/ls"])
        empty = await call(client, "run", command=[])
    assert refused.is_error
    assert "'rm' is not allowed" in text_of(refused)
    assert "ls, cat, wc" in text_of(refused)
    assert by_path.is_error
    assert empty.is_error
    assert (tmp_path / "a.txt").exists()
    assert audit(tmp_path) == []


async def test_run_kills_a_program_that_outlives_its_timeout(tmp_path: Path) -> None:
    async with connected(tmp_path, "--allow", "sleep") as client:
        started = time.monotonic()
        result = await call(client, "run", command=["sleep", "30"], timeout_s=0.5)
        took = time.monotonic() - started
    assert result.structured_content is not None
    assert result.structured_content["timed_out"] is True
    assert result.structured_content["exit_code"] < 0  # killed by a signal
    assert took < 10


async def test_run_stops_a_file_at_the_size_limit(tmp_path: Path) -> None:
    async with connected(tmp_path, "--allow", "dd") as client:
        result = await call(
            client, "run", command=["dd", "if=/dev/zero", "of=big", "bs=1M", "count=32"]
        )
    assert result.structured_content is not None
    assert result.structured_content["exit_code"] != 0  # SIGXFSZ, or dd's own error
    assert (tmp_path / "big").stat().st_size <= FILE_SIZE_LIMIT_BYTES


async def test_the_test_helpers_sleep_and_count(tmp_path: Path) -> None:
    async with connected(tmp_path) as client:
        slept = await call(client, "sleep", seconds=0.05)
        first = await call(client, "touch_counter", name="visits")
        second = await call(client, "touch_counter", name="visits")
    assert text_of(slept) == "slept 0.05 s"
    assert (first.structured_content, second.structured_content) == ({"result": 1}, {"result": 2})
    assert (tmp_path / "counters" / "visits").read_text() == "2"
    assert audit(tmp_path) == ["touch_counter visits"] * 2


# ----------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def accepting(port: int, server: Process, log: Path) -> None:
    """Return once the server accepts connections; fail if it exits first."""

    async def accepts() -> bool:
        if server.returncode is not None:
            output = await anyio.Path(log).read_text()
            pytest.fail(f"the server exited with {server.returncode}: {output}")
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            return False
        await stream.aclose()
        return True

    await wait_until(accepts, within=30, what="the server to accept connections", every=0.05)


@asynccontextmanager
async def http_server(workspace: Path, port: int, log: Path) -> AsyncIterator[None]:
    """The server on Streamable HTTP at loopback ``port``, accepting, until the block ends."""
    with log.open("wb") as out:
        server = await anyio.open_process(
            [sys.executable, *server_args(workspace, "--http", str(port))],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        await accepting(port, server, log)
        yield
    finally:
        server.terminate()
        with anyio.move_on_after(10):
            await server.wait()
        if server.returncode is None:
            server.kill()
        await server.aclose()


async def test_it_serves_streamable_http_on_loopback(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("hi")
    port = free_port()
    async with http_server(workspace, port, tmp_path / "server.log"):
        with anyio.fail_after(30):
            async with Client(
                f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=CALL_S
            ) as client:
                listed = await call(client, "list_files")
    assert listed.structured_content == {"result": ["a.txt"]}
