"""What every command shares, so that they all behave the same way.

The two consoles, the output modes (``-o table|json|yaml``) and the options more than
one command takes; the settings the root callback fills in (``STATE``); and the one
place where errors become a plain sentence and an exit code: 0 ok, 1 failure (Redis
away, unknown agent, ...), 2 usage or validation error; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import anyio
import typer
import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from agentos.client import Client, ClientError
from agentos.core.spec import Document, SpecError, load_paths
from agentos.engine import EngineError
from agentos.ingress import CONTROL_CHARS
from agentos.settings import Settings
from agentos.store import StoreUnavailable
from agentos.store.embedded import EmbeddedRedisError

T = TypeVar("T")


# Agent names, results and errors are data: never emoji codes (":smile:") to replace.
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


class Output(enum.StrEnum):
    """How read commands print."""

    table = "table"
    json = "json"
    yaml = "yaml"


class _State:
    settings: Settings = Settings()
    debug: bool = False


STATE = _State()


OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="Print as a table, JSON or YAML.")
]
FilesOpt = Annotated[
    list[Path],
    typer.Option("--file", "-f", help="A YAML file or a folder of them (repeatable)."),
]


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every control character (``agentos.ingress.CONTROL_CHARS``) but those
    in ``keep`` written as an escape (``\\n``, ``\\x1b``, ``\\u202e``): names, messages and
    errors are data, and must not move the cursor, colour the terminal or start a line
    that looks like another event."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        code = ord(char)
        return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")

    return CONTROL_CHARS.sub(escape, text)


def cell(value: object, style: str = "") -> Text:
    """A table cell holding ``value`` as text: never markup, never a control character."""
    return Text(printable(str(value)), style=style)


def _fail(message: str, code: int = 1) -> NoReturn:
    # Errors quote names, answers and upstream text: data, never markup.
    err.print(Text.assemble(("error:", "red"), " ", printable(message)), highlight=False)
    raise typer.Exit(code)


def hides_userinfo(url: str) -> bool:
    """Whether ``url`` seems to hold a user or password that its parsers cannot find.

    A ``/``, ``?`` or ``#`` in a password ends the URL's authority early, so every parser
    (and :func:`agentos.store.redact_url`) takes the rest for a path, query or fragment,
    and shows the password in its error: an ``@`` there (outside a query's ``key=value``)
    is the sign. A URL without ``scheme://`` has no authority at all.
    """
    scheme, sep, rest = url.partition("://")
    if "@" not in url:
        return False
    if not sep or not scheme:
        return True
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    tail = rest[end:]
    tail, _, fragment = tail.partition("#")
    path, _, query = tail.partition("?")
    if "@" in path or "@" in fragment:
        return True
    return any("@" in piece.partition("=")[0] for piece in query.split("&"))


def check_redis_url(url: str) -> None:
    """Refuse (exit 2) a Redis URL that :func:`hides_userinfo`, without printing it."""
    if hides_userinfo(url):
        _fail(
            "--redis / AGENTOS_REDIS_URL: cannot tell the user and password from the host "
            "(expected redis://USER:PASSWORD@HOST:PORT/DB, with '/', '?', '#' and '@' in a "
            "password written %2F, %3F, %23, %40); the URL is not shown, it holds a password",
            2,
        )


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning agentos errors into one line and an exit code."""
    try:
        return anyio.run(fn)
    except (typer.Exit, SystemExit):
        raise
    except BaseException as e:
        error = _leaf(e)
        if isinstance(error, (typer.Exit, SystemExit)):
            raise error from None
        if isinstance(error, KeyboardInterrupt):
            raise typer.Exit(130) from None
        if isinstance(error, SpecError):
            for issue in error.issues:
                err.print(str(issue), markup=False)
            err.print(f"{len(error.issues)} error(s); nothing was applied", markup=False)
            raise typer.Exit(2) from None
        if STATE.debug:
            raise
        if isinstance(error, (ClientError, StoreUnavailable, EmbeddedRedisError, EngineError)):
            _fail(str(error))
        _fail(
            f"internal error: {type(error).__name__}: {error} "
            "(run again with --debug for the traceback)"
        )


def _leaf(error: BaseException) -> BaseException:
    """The one real error inside task-group exception groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _command(action: Callable[[Client], Awaitable[object]], done: str) -> None:
    """Run one client call and print what was done."""

    async def go() -> None:
        async with await _client() as client:
            await action(client)
        out.print(done, markup=False)

    _run(go)


def complete_agents(incomplete: str) -> list[str]:
    """Shell completion of agent names (``--install-completion``): the applied agents
    starting with ``incomplete``, read from the fleet that ``AGENTOS_REDIS_URL`` (or the
    embedded server) names. Never fails: a fleet out of reach completes nothing."""

    async def names() -> list[str]:
        with anyio.fail_after(2.0):
            async with await Client.connect(Settings.from_env()) as client:
                return sorted(await client.store.specs.agents())

    try:
        return [n for n in anyio.run(names) if n.startswith(incomplete)]
    except Exception:  # completion must never print an error into the shell
        return []


AgentArg = Annotated[str, typer.Argument(metavar="NAME", autocompletion=complete_agents)]
"""An agent's name, completed from the fleet."""


async def _client() -> Client:
    if STATE.settings.redis_url:
        check_redis_url(STATE.settings.redis_url)
    return await Client.connect(STATE.settings)


def _emit(data: Any, output: Output, table: Callable[[], Table | str]) -> None:
    if output is Output.json:
        out.print(json.dumps(data, indent=2, sort_keys=False, default=str), markup=False)
    elif output is Output.yaml:
        out.print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip(), markup=False)
    else:
        rendered = table()
        if isinstance(rendered, str):
            out.print(rendered, markup=False)
        else:
            _print_table(rendered)


_UNBOUNDED = 1 << 20


def _print_table(table: Table) -> None:
    """Print ``table`` fitted to the terminal, or with whole columns when piped.

    A pipe has no width: cutting to rich's default 80 columns would hand ``grep`` and
    ``awk`` ellipses (``AGENT-…``), so, like kubectl, a table that does not go to a
    terminal is rendered at its natural width, without trailing blanks.
    """
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update_width(_UNBOUNDED), table).maximum
    buffer = io.StringIO()
    wide = Console(file=buffer, width=max(natural, 1), highlight=False, emoji=False)
    wide.print(table)
    out.file.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))
    out.file.flush()


def _print_text(text: str) -> None:
    """Print ``text`` as it is (no markup, emoji codes or wrapping; lines and tabs kept,
    other control characters escaped), then a newline."""
    text = printable(text, keep="\n\t")
    out.file.write(text if text.endswith("\n") else text + "\n")
    out.file.flush()


def _load(files: Sequence[Path]) -> list[Document]:
    if not files:
        _fail("give at least one -f FILE or folder", 2)
    return load_paths(files)


def _run_sync_load(files: Sequence[Path]) -> list[Document]:
    try:
        return _load(files)
    except SpecError as e:
        for issue in e.issues:
            err.print(str(issue), markup=False)
        err.print(f"{len(e.issues)} error(s); nothing was applied", markup=False)
        raise typer.Exit(2) from None


class _Printable(logging.Formatter):
    """Log lines are data (an agent's text, a server's error): escaped, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _ByLogger(logging.Filter):
    """Agents' own lines (``agentos.agent.*``) from INFO, the rest from ``level``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self.agents = min(level, logging.INFO) if level <= logging.WARNING else level

    def filter(self, record: logging.LogRecord) -> bool:
        wanted = self.agents if record.name.startswith("agentos.agent.") else self.level
        return record.levelno >= wanted


def _setup_logging(level: int) -> None:
    """The process's log on stderr at ``level``; agents' ``ctx.log`` lines show from INFO
    (unless ``level`` is above WARNING)."""
    level = logging.DEBUG if STATE.debug else level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Printable("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_ByLogger(level))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    # The rest of the process's INFO (HTTP clients, the MCP package) stays quiet.
    for noisy in ("httpx", "httpx2", "mcp", "uvicorn"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
