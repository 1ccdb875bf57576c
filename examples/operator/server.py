"""An MCP tool server that gives an agent one workspace directory and a few safe programs.

The operator example (``examples/operator``) needs tools a model can misuse without
harm: list, read and write files under one directory, and run allow-listed programs
there. This module serves them with the ``mcp`` package's server API::

    python -m examples.operator.server --workspace DIR                # stdio
    python -m examples.operator.server --workspace DIR --http 8765    # http://127.0.0.1:8765/mcp

``OPERATOR_WORKSPACE`` names the workspace when ``--workspace`` is not given; the
directory is created if missing. ``--allow CMD ...`` replaces the allowed programs.

Every path argument is resolved inside the workspace: absolute paths, ``..`` and
symlinks that lead out are refused. ``run`` starts the program without a shell, in the
workspace, with a small environment and resource limits (CPU, memory, file size,
processes, open files). It is a guard rail against a model's mistakes, not a sandbox
against a hostile caller: the allow-list names programs, not their arguments
(``cat /etc/passwd`` runs), so serve untrusted callers from a container.

Each side effect appends a line to ``.operator-audit.log`` in the workspace (one
``O_APPEND`` write), so tests can count how often a call really ran. ``sleep`` and
``touch_counter`` are test and diagnostic helpers: a slow call, and a call that is
not idempotent.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

__all__ = [
    "DEFAULT_ALLOW",
    "RunResult",
    "Settings",
    "Workspace",
    "build_server",
    "main",
    "parse_args",
]

DEFAULT_ALLOW = ("ls", "cat", "wc", "head", "tail", "grep", "echo", "date", "sort", "uniq")
AUDIT_LOG = ".operator-audit.log"
WORKSPACE_ENV = "OPERATOR_WORKSPACE"

MAX_TIMEOUT_S = 60.0
MAX_SLEEP_S = 300.0
MAX_OUTPUT_BYTES = 64 * 1024
MAX_READ_BYTES = 1024 * 1024
MAX_LISTED = 1000

MAX_WRITE_CHARS = 100_000
# Bounded parameters: a small local model writing a tool call under a JSON-schema
# constraint otherwise fills an unbounded string until its token cap.
Path_ = Annotated[
    str, Field(max_length=200, description='a path relative to the workspace ("." is its top)')
]

MEMORY_LIMIT_BYTES = 512 * 1024 * 1024
FILE_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
OPEN_FILES_LIMIT = 256
# RLIMIT_NPROC counts every task of the user, not the child's own: in a container the
# user often runs many already, and a fixed 64 would stop the child from forking at
# all. So the limit is what the user runs now plus this many more.
EXTRA_PROCESSES = 64


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What the command line (or ``OPERATOR_WORKSPACE``) asks for."""

    workspace: Path
    allow: tuple[str, ...] = DEFAULT_ALLOW
    host: str = "127.0.0.1"
    port: int | None = None  # None: serve stdio


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> Settings:
    """The settings from ``argv``; exits with a usage error if no workspace is named."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.operator.server",
        description="An MCP server with file and command tools confined to one workspace.",
    )
    parser.add_argument("--workspace", type=Path, help=f"the directory (or ${WORKSPACE_ENV})")
    parser.add_argument("--http", type=int, metavar="PORT", help="serve Streamable HTTP at /mcp")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default: loopback)")
    parser.add_argument(
        "--allow",
        nargs="+",
        action="extend",
        metavar="CMD",
        help=f"programs run may start, replacing the default: {' '.join(DEFAULT_ALLOW)}",
    )
    args = parser.parse_args(argv)
    workspace = args.workspace or environ.get(WORKSPACE_ENV)
    if not workspace:
        parser.error(f"no workspace: pass --workspace DIR or set {WORKSPACE_ENV}")
    allow = tuple(args.allow) if args.allow else DEFAULT_ALLOW
    for program in allow:
        if "/" in program and not os.path.isabs(program):
            parser.error(f"--allow {program}: give a bare name (found on PATH) or an absolute path")
    return Settings(workspace=Path(workspace), allow=allow, host=args.host, port=args.http)


# ----------------------------------------------------------------------------- the workspace


@contextlib.contextmanager
def _reported(path: str) -> Iterator[None]:
    """Turn an OSError into a ToolError: the model reads its reason, a crash would hide it."""
    try:
        yield
    except OSError as e:
        raise ToolError(f"{path}: {e.strerror or e}") from e


class Workspace:
    """The directory the tools work in: path checks, atomic writes and the audit log."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` inside the workspace.

        Raises ToolError for an absolute path, control characters, or a path that leads
        out of the workspace (through ``..`` or a symlink).
        """
        if any(ord(c) < 32 for c in path):
            raise ToolError(f"{path!r}: paths may not contain control characters")
        if os.path.isabs(path):
            raise ToolError(f"{path}: give a path relative to the workspace, not an absolute one")
        try:
            real = (self.root / path).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise ToolError(f"{path}: {e}") from e
        if real != self.root and self.root not in real.parents:
            raise ToolError(f"{path}: leads out of the workspace")
        return real

    def relative(self, real: Path) -> str:
        """``real`` as the tools show it: relative to the workspace, ``.`` for its top."""
        return real.relative_to(self.root).as_posix()

    def replace(self, real: Path, data: bytes) -> None:
        """Write ``data`` to ``real`` all at once: readers see the old file or the new one."""
        real.parent.mkdir(parents=True, exist_ok=True)
        mode = real.stat().st_mode & 0o777 if real.is_file() else 0o644
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def audit(self, line: str) -> None:
        """Append one line to the audit log, in one write, so concurrent lines never mix."""
        fd = os.open(self.root / AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


def list_entries(ws: Workspace, path: str) -> list[str]:
    """The entries of a workspace directory, sorted, as workspace paths (dirs end in /)."""
    real = ws.resolve(path)
    with _reported(path), os.scandir(real) as it:
        found = [(e.name, e.is_dir()) for e in it]
    prefix = "" if real == ws.root else f"{ws.relative(real)}/"
    entries = sorted(f"{prefix}{name}{'/' if is_dir else ''}" for name, is_dir in found)
    if len(entries) > MAX_LISTED:
        return [*entries[:MAX_LISTED], f"[... {len(entries) - MAX_LISTED} more entries]"]
    return entries


def read_text(ws: Workspace, path: str, max_bytes: int) -> str:
    """The text of a workspace file (UTF-8, bad bytes replaced), cut at ``max_bytes``."""
    if max_bytes < 1:
        raise ToolError("max_bytes must be at least 1")
    limit = min(max_bytes, MAX_READ_BYTES)
    real = ws.resolve(path)
    with _reported(path), real.open("rb") as f:
        data = f.read(limit + 1)
        size = max(os.fstat(f.fileno()).st_size, len(data))
    text = data[:limit].decode("utf-8", errors="replace")
    if len(data) > limit:
        text += f"\n[... cut: showing the first {limit} of {size} bytes]"
    return text


def write_text(ws: Workspace, path: str, content: str) -> str:
    """Replace (or create) a workspace file with ``content``; says how much it wrote."""
    real = ws.resolve(path)
    if real == ws.root / AUDIT_LOG:
        raise ToolError(f"{path}: the audit log is the server's own")
    data = content.encode()
    with _reported(path):
        ws.replace(real, data)
    shown = ws.relative(real)
    ws.audit(f"write_file {shown}")
    return f"wrote {len(data)} bytes to {shown}"


def touch(ws: Workspace, name: str) -> int:
    """Add one to the counter ``counters/<name>`` and return its new value."""
    if not name or "/" in name or name in (".", ".."):
        raise ToolError(f"{name!r}: a counter name is one plain word, like 'visits'")
    real = ws.resolve(f"counters/{name}")
    with _reported(f"counters/{name}"):
        real.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(real.parent, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other calls and other servers on this workspace
            text = real.read_text().strip() if real.exists() else "0"
            if not text.isdigit():
                raise ToolError(f"counters/{name} does not hold a count: {text[:40]!r}")
            value = int(text) + 1
            ws.replace(real, str(value).encode())
        finally:
            os.close(lock)
    ws.audit(f"touch_counter {name}")
    return value


# ----------------------------------------------------------------------------- run


class RunResult(TypedDict):
    """What run answers: exit_code (negative: killed by that signal), output, timed_out."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool


@dataclass
class _Capped:
    """The first MAX_OUTPUT_BYTES of a stream, and how many bytes came after them."""

    kept: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = MAX_OUTPUT_BYTES - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.total > len(self.kept):
            text += f"\n[... cut: {self.total - len(self.kept)} more bytes]"
        return text


def _user_tasks() -> int | None:
    """How many tasks (threads) this user runs now, as RLIMIT_NPROC counts them.

    None where /proc cannot be read. /proc shows the effective owner and only this PID
    namespace, so the count can be short; the child then forks less, never more.
    """
    uid = os.getuid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
    return count


def _lowered(which: int, soft: int, hard: int) -> tuple[int, int]:
    """(soft, hard) no higher than the current hard limit, which only root may raise."""
    current = resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
    return min(soft, hard), hard


def child_limits(timeout_s: float) -> list[tuple[int, tuple[int, int]]]:
    """The resource limits for a child of ``run``, computed in the server, set in the child."""
    cpu_s = math.ceil(timeout_s)
    wanted = [
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL after
        (resource.RLIMIT_AS, MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES),
        (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES),
        (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
    ]
    tasks = _user_tasks()
    if tasks is not None:
        wanted.append((resource.RLIMIT_NPROC, tasks + EXTRA_PROCESSES, tasks + EXTRA_PROCESSES))
    return [(which, _lowered(which, soft, hard)) for which, soft, hard in wanted]


def _setting(limits: list[tuple[int, tuple[int, int]]]) -> Callable[[], None]:
    """A preexec_fn that only calls setrlimit: between fork and exec nothing else is safe."""

    def apply() -> None:
        for which, values in limits:
            resource.setrlimit(which, values)

    return apply


def _child_env(root: Path) -> dict[str, str]:
    """PATH (absolute entries only, so no workspace file shadows a program), LANG, HOME."""
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if os.path.isabs(p)
    )
    return {"PATH": path, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": str(root)}


def _collect(proc: subprocess.Popen[bytes], timeout_s: float) -> RunResult:
    """Read both pipes until the child ends or the time is up; kill its group if it is."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    out = {proc.stdout.fileno(): _Capped(), proc.stderr.fileno(): _Capped()}
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in out:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and not timed_out:
            remaining = deadline - time.monotonic()
            timed_out = remaining <= 0
            for key, _ in [] if timed_out else selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    out[key.fd].add(chunk)
                else:
                    selector.unregister(key.fd)
    if not timed_out:
        try:
            proc.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        # The group, not just the child: grandchildren would keep running. Before the
        # wait, so the group id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stdout, stderr = (out[stream.fileno()].text() for stream in (proc.stdout, proc.stderr))
    proc.stdout.close()
    proc.stderr.close()
    return RunResult(exit_code=proc.returncode, stdout=stdout, stderr=stderr, timed_out=timed_out)


def run_command(
    ws: Workspace, allow: Sequence[str], command: list[str], timeout_s: float
) -> RunResult:
    """Run an allow-listed program in the workspace; blocks, so call it from a worker thread.

    Raises ToolError for an empty or disallowed command, a bad timeout, or a program
    that cannot be started.
    """
    if not command:
        raise ToolError('command is empty: give the program and its arguments, like ["ls", "-l"]')
    program = command[0]
    if program not in allow:
        raise ToolError(f"{program!r} is not allowed; allowed commands: {', '.join(allow)}")
    if not timeout_s > 0:  # also refuses NaN
        raise ToolError("timeout_s must be a positive number of seconds")
    timeout_s = min(timeout_s, MAX_TIMEOUT_S)
    env = _child_env(ws.root)
    executable = shutil.which(program, path=env["PATH"])
    if executable is None:
        raise ToolError(f"{program!r} is allowed but not installed here")
    try:
        proc = subprocess.Popen(
            command,
            executable=executable,
            cwd=ws.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_setting(child_limits(timeout_s)),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise ToolError(f"{program}: could not start: {e}") from e
    ws.audit(f"run {json.dumps(command)}")
    return _collect(proc, timeout_s)


# ----------------------------------------------------------------------------- the server


def build_server(ws: Workspace, allow: Sequence[str] = DEFAULT_ALLOW) -> MCPServer[Any]:
    """An MCPServer whose tools work in ``ws``; ``run`` starts only programs in ``allow``.

    Sync tools run on the SDK's worker threads, so file I/O and ``run`` never block the
    event loop. A ToolError becomes an ``is_error`` result with its message.
    """
    server: MCPServer[Any] = MCPServer(
        "operator-workspace",
        instructions="Files and commands in one workspace directory. Paths are relative to it.",
    )
    allowed = ", ".join(allow)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def list_files(path: Path_ = ".") -> list[str]:
        """List a folder of the workspace ("." is the top). Folders end with "/"."""
        return list_entries(ws, path)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def read_file(
        path: Path_,
        max_bytes: Annotated[int, Field(ge=1, le=MAX_READ_BYTES)] = 65536,
    ) -> str:
        """Read a text file of the workspace. Long files are cut at max_bytes."""
        return read_text(ws, path, max_bytes)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    def write_file(
        path: Path_,
        content: Annotated[str, Field(max_length=MAX_WRITE_CHARS, description="the text")],
    ) -> str:
        """Write content to a file of the workspace, replacing it. Creates folders as needed."""
        return write_text(ws, path, content)

    @server.tool(
        description=(
            "Run a program in the workspace folder, without a shell (no pipes, no >). "
            f'command is the program and its arguments, like ["ls", "-l"]. Allowed: {allowed}. '
            "Returns exit_code, stdout, stderr and timed_out."
        ),
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False),
    )
    def run(
        command: Annotated[
            list[Annotated[str, Field(max_length=200)]],
            Field(min_length=1, max_length=16, description="the program, then its arguments"),
        ],
        timeout_s: Annotated[
            float, Field(ge=0, le=MAX_TIMEOUT_S, description="seconds before it is killed")
        ] = 10,
    ) -> RunResult:
        return run_command(ws, allow, command, timeout_s)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def sleep(seconds: float) -> str:
        """Test helper: wait this many seconds (at most 300), then answer."""
        if not seconds >= 0:  # also refuses NaN
            raise ToolError("seconds must be zero or more")
        seconds = min(seconds, MAX_SLEEP_S)
        await anyio.sleep(seconds)
        return f"slept {seconds:g} s"

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=False))
    def touch_counter(name: str) -> int:
        """Test helper: add one to the counter called name and return its new value."""
        return touch(ws, name)

    return server


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the workspace tools over stdio, or over Streamable HTTP with ``--http``."""
    settings = parse_args(argv)
    server = build_server(Workspace(settings.workspace), settings.allow)
    if settings.port is None:
        server.run("stdio")
    else:
        server.run(
            "streamable-http",
            host=settings.host,
            port=settings.port,
            streamable_http_path="/mcp",
        )


if __name__ == "__main__":
    main()
