"""One MCP session with one tool server: how it is opened, listened to and read.

The :class:`~agentos.tools.mcp.ToolServerPool` owns the sessions and their tasks; this
module holds what one session is (:class:`Session`), the transport it is opened over
(a child process over stdio, or a URL over Streamable HTTP, with its secrets read at
open and never stored or logged), how its tools are listed and what agentos decides
about each (:class:`ServerTool`), and what the model reads of a call's result.
Whatever a server writes (its stderr, its session id, its errors) is made one printable
line before it reaches an event or a log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import IO, Any

import anyio
import anyio.lowlevel
import httpx2
import mcp_types
from mcp import Client
from mcp.client import IncomingMessage, Transport
from mcp.client.session import MessageHandlerFnT
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from agentos.core.modelspec import SecretRef
from agentos.core.toolserver import PYTHON, ToolServerSpec, matches, qualified
from agentos.settings import SecretUnreadable, read_secret
from agentos.tools.base import ToolError, ToolServerUnavailable

__all__ = [
    "TRACE_KEYS",
    "ServerTool",
    "Session",
    "body_hash",
    "fetch_tools",
    "first_line",
    "listen",
    "message_handler",
    "printable",
    "resolve_secret",
    "result_of",
    "server_tools",
    "transport",
]

log = logging.getLogger("agentos.tools.mcp")

# W3C trace context, carried in a request's ``_meta`` and, over HTTP, as headers.
TRACE_KEYS = ("traceparent", "tracestate")


def resolve_secret(ref: SecretRef | str, where: str) -> str:
    """The value of a literal or of ``{env: VAR}`` / ``{file: PATH}``, read now (never
    stored or logged); ToolServerUnavailable naming ``where`` when it cannot be read."""
    if isinstance(ref, str):
        return ref
    try:
        return read_secret(ref.env, ref.file)
    except SecretUnreadable as e:
        raise ToolServerUnavailable(f"{where}: {e}") from None


@dataclass(frozen=True, slots=True)
class ServerTool:
    """One tool as a server lists it, with what agentos decided about it."""

    server: str
    name: str  # on the server
    description: str
    schema: Mapping[str, Any]
    idempotent: bool
    approval: bool
    approval_timeout_s: float = 3600.0
    approval_on_timeout: str = "deny"

    @property
    def qualified(self) -> str:
        """``SERVER.TOOL``: the name agent code and approval lists use."""
        return qualified(self.server, self.name)


@dataclass
class Session:
    """One open (or opening) session with one server."""

    name: str
    spec: ToolServerSpec
    spec_hash: str
    ready: anyio.Event = field(default_factory=anyio.Event)
    closing: anyio.Event = field(default_factory=anyio.Event)
    client: Client | None = None
    tools: list[ServerTool] | None = None
    stale: bool = False  # the server said its tools changed
    error: str = ""  # why it failed to open or was lost
    session_id: str = ""
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    closed: bool = False
    stderr: IO[str] | None = None  # a stdio server's stderr (a temporary file)

    def stderr_tail(self) -> str:
        """The last line the server wrote to stderr, escaped (empty if none)."""
        f = self.stderr
        if f is None or f.closed:
            return ""
        try:
            f.flush()
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 2000))
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        except (OSError, ValueError):
            return ""
        return printable(lines[-1][:300]) if lines else ""


async def transport(session: Session, stack: AsyncExitStack, *, cwd: str | None) -> Transport:
    """The transport ``session`` is opened over; what it holds (the stdio server's stderr
    file, the HTTP client) is closed with ``stack``. Raises ToolServerUnavailable when a
    secret it needs cannot be read."""
    spec = session.spec
    where = f"tool server {session.name!r}"
    if spec.stdio is not None:
        command = list(spec.stdio.command)
        if command[0] == PYTHON:
            command[0] = sys.executable
        env = {k: resolve_secret(v, f"{where}: stdio.env.{k}") for k, v in spec.stdio.env.items()}
        params = StdioServerParameters(
            command=command[0],
            args=command[1:],
            env=env or None,
            cwd=spec.stdio.cwd or cwd,
        )
        # Its stderr is kept (bounded, escaped) for the error that says why it failed,
        # not poured raw into the daemon's output.
        errlog = tempfile.TemporaryFile("w+", errors="replace")  # noqa: SIM115 - on the stack
        session.stderr = stack.enter_context(errlog)
        return stdio_client(params, errlog=session.stderr)
    assert spec.url is not None
    headers = {k: resolve_secret(v, f"{where}: headers.{k}") for k, v in spec.headers.items()}

    async def note_session(response: httpx2.Response) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid:
            session.session_id = printable(sid[:200])

    http = await stack.enter_async_context(
        httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(spec.timeouts.call, connect=spec.timeouts.connect),
            event_hooks={"request": [_trace_context_headers], "response": [note_session]},
        )
    )
    return streamable_http_client(spec.url, http_client=http)


async def listen(session: Session, client: Client) -> None:
    """On a 2026-07-28 session, the server says its tools changed on a listen stream
    (older ones send a notification: :func:`message_handler`)."""
    if client.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return
    try:
        async with client.listen(tools_list_changed=True) as sub:
            async for _ in sub:
                session.stale = True
    except Exception as e:  # no listen support, or the stream dropped: list per task
        log.debug("tool server %s: no change stream: %s", session.name, e)


def message_handler(session: Session) -> MessageHandlerFnT:
    """The session's handler of server notifications: a changed tool list marks it stale."""

    async def handle(message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            session.stale = True  # listed again before the next agent gets them
        await anyio.lowlevel.checkpoint()

    return handle


async def fetch_tools(client: Client) -> list[mcp_types.Tool]:
    """Every tool the server lists, page by page (at most 100 pages)."""
    listed: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(100):  # a paginator that never ends cannot hang us
        page = await client.list_tools(cursor=cursor) if cursor else await client.list_tools()
        listed.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return listed


def server_tools(name: str, spec: ToolServerSpec, listed: list[mcp_types.Tool]) -> list[ServerTool]:
    """The tools of server ``name`` its spec admits, with what agentos decided of each."""
    return [
        ServerTool(
            server=name,
            name=t.name,
            description=(t.description or t.title or t.name).strip(),
            schema=t.input_schema or {"type": "object", "properties": {}},
            # Safe to run again: the server says so, or it changes nothing at all.
            idempotent=bool(
                t.annotations and (t.annotations.idempotent_hint or t.annotations.read_only_hint)
            )
            or matches(t.name, spec.tools.idempotent),
            approval=spec.needs_approval(t.name),
            approval_timeout_s=spec.approval.timeout,
            approval_on_timeout=spec.approval.on_timeout,
        )
        for t in listed
        if spec.tools.admits(t.name)
    ]


async def _trace_context_headers(request: httpx2.Request) -> None:
    """Send the trace context of a JSON-RPC request's ``params._meta`` as HTTP headers
    too, for proxies and servers that read ``traceparent`` from the request."""
    if request.method != "POST" or b'"traceparent"' not in request.content:
        return
    try:
        meta = json.loads(request.content).get("params", {}).get("_meta", {})
    except (ValueError, AttributeError):
        return
    if not isinstance(meta, dict):
        return
    for key in TRACE_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value.isprintable() and key not in request.headers:
            request.headers[key] = value


def body_hash(body: Mapping[str, Any]) -> str:
    """What tells a changed ToolServer from the one a session was opened for."""
    return json.dumps(body.get("spec", {}), sort_keys=True)


def printable(text: str) -> str:
    """Server text made one safe line: control characters shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(e: BaseException) -> str:
    """The first line of ``e`` (of the first error of a group), printable."""
    if isinstance(e, BaseExceptionGroup) and e.exceptions:
        return first_line(e.exceptions[0])
    text = str(e).strip().splitlines()
    return printable(text[0][:300]) if text else type(e).__name__


def result_of(result: mcp_types.CallToolResult) -> Any:
    """What the model reads of a call's result: its text blocks (else its structured
    content); ToolError for a result the server marks ``isError``."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        else:
            kind = getattr(block, "type", type(block).__name__)
            parts.append(f"[{kind} content not shown]")
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(text or "the tool failed")
    if result.structured_content is not None and not text:
        return result.structured_content
    return text
