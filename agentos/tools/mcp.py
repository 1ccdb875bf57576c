"""MCP tool servers: one client session per daemon and ToolServer, shared by its agents.

A ToolServer (:mod:`agentos.core.toolserver`) is spoken to with the official ``mcp``
package: a child process over stdio, or a URL over Streamable HTTP. The
:class:`ToolServerPool` of a daemon opens a server on first use, keeps one session for
every agent of that daemon, caches its tool list (listed again when the server says it
changed) and closes it once no agent has used it for ``idle_s``. Agents hold no
session of their own: a hibernated, waiting or released agent costs a server nothing.

Each session lives in a task of the pool's own (an MCP client's context must be
entered and left by one task); calls are made from the agents' tasks over it. What goes
wrong with the server itself, that it does not start, exits mid-call, answers garbage
or nothing at all, is :class:`ToolServerUnavailable`: the infrastructure's fault, never
the agent's (the runtime retries the task later with an event naming the server). What
goes wrong in a tool (its ``isError`` result) goes back to the model as the result.

Trace context goes with every call (MCP's SEP-414): the ``mcp`` package itself writes the
W3C ``traceparent`` of the span current at the call into the request's ``params._meta``
(with the global OpenTelemetry propagator; under agentos's own tracer, a ``MCP send
tools/call`` span child of the ``execute_tool`` span). The pool's ``trace_headers``
callback (the daemon passes its telemetry's) adds the caller's context there even where
the package would not, and over Streamable HTTP the request also carries it as the
``traceparent`` / ``tracestate`` headers, copied from the body it sends: the session's
HTTP requests are made by the session's own task, not in the caller's context.

What one session is, its transport, its tool list and its results are in
:mod:`agentos.tools.mcp_session`; this module keeps the sessions of a daemon.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any, cast

import anyio
import anyio.abc
import jsonschema
import mcp_types
from mcp import Client
from mcp.shared.exceptions import MCPError

from agentos.core.toolserver import ToolServerResource, model_tool_name
from agentos.tools.base import ArgumentsInvalid, Tool, ToolError, ToolServerUnavailable
from agentos.tools.mcp_session import (
    TRACE_KEYS,
    ServerTool,
    Session,
    body_hash,
    fetch_tools,
    first_line,
    listen,
    message_handler,
    resolve_secret,
    result_of,
    server_tools,
    transport,
)

__all__ = ["ServerTool", "ToolServerPool", "resolve_secret"]

log = logging.getLogger("agentos.tools.mcp")

DEFAULT_IDLE_S = 300.0
_GRACE_S = 5.0  # past the call timeout, a transport that never returns is cut
# JSON-RPC codes that say the connection, not the tool, failed.
_TRANSPORT_CODES = frozenset({mcp_types.CONNECTION_CLOSED, mcp_types.REQUEST_TIMEOUT})

Specs = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]
"""Reads the stored ToolServers: name -> canonical body."""


class ToolServerPool:
    """The daemon's MCP sessions, by ToolServer (see the module docstring).

    ``specs()`` returns the stored ToolServers (name -> canonical body); it is read when
    an agent's tools are asked for, so an applied change reaches the next task.
    Use it as an async context manager (its sessions' tasks live in it).
    ``trace_headers()`` (optional) returns the caller's trace context as W3C headers
    (``traceparent``...); each call sends it in ``_meta`` and, over HTTP, as headers.
    """

    def __init__(
        self,
        specs: Specs,
        *,
        idle_s: float = DEFAULT_IDLE_S,
        cwd: str | None = None,
        trace_headers: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self._specs = specs
        # The current trace context as W3C headers, read in the calling agent's task.
        self._trace_headers = trace_headers
        self.idle_s = idle_s
        self.cwd = cwd
        self._sessions: dict[str, Session] = {}
        self._bodies: dict[str, Mapping[str, Any]] = {}  # as last read: name -> canonical body
        self._stack = AsyncExitStack()
        self._tg: anyio.abc.TaskGroup | None = None
        self._lock = anyio.Lock()
        self.started = 0  # sessions opened, for tests and `describe`

    async def __aenter__(self) -> ToolServerPool:
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._tg.start_soon(self._reap)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in list(self._sessions.values()):
            s.closing.set()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._stack.aclose()
        self._sessions.clear()

    # ------------------------------------------------------------------ tools of an agent

    async def tools(self, servers: Iterable[str]) -> list[ServerTool]:
        """The tools agents may use on ``servers`` (opened if need be), in server order.
        Raises ToolServerUnavailable naming the server that cannot be reached."""
        out: list[ServerTool] = []
        self._bodies = dict(await self._specs())  # an apply reaches the next task
        for name in servers:
            old = self._sessions.get(name)
            body = self._bodies.get(name)
            if old is not None and (body is None or body_hash(body) != old.spec_hash):
                self._drop(old)  # changed by an apply (or deleted): opened anew
            session = await self._open(name)
            if session.tools is None or session.stale:
                await self._list(session)
            assert session.tools is not None
            out.extend(session.tools)
        return out

    def describe(self) -> dict[str, dict[str, Any]]:
        """What each open session is doing (for the daemon's heartbeat)."""
        now = time.monotonic()
        return {
            name: {
                "transport": s.spec.transport,
                "open": s.client is not None and not s.closed,
                "tools": len(s.tools or ()),
                "inFlight": s.in_flight,
                "idleS": round(now - s.last_used, 1),
            }
            for name, s in self._sessions.items()
        }

    async def call(self, server: str, tool: str, arguments: Mapping[str, Any]) -> Any:
        """Call ``tool`` on ``server``; its result as text or data for the model.

        Raises ToolError for the tool's own error (``isError``: the model reads it) and
        ToolServerUnavailable when the server cannot answer (not started, gone, hung).
        """
        session = await self._open(server)
        client = session.client
        assert client is not None
        timeout = session.spec.timeouts.call
        meta = self._trace_meta()
        session.in_flight += 1
        session.last_used = time.monotonic()
        try:
            with anyio.fail_after(timeout + _GRACE_S):
                result = await client.call_tool(
                    tool, dict(arguments), read_timeout_seconds=timeout, meta=meta
                )
        except TimeoutError:
            self._lost(session, f"no answer to {tool} within {timeout:g}s")
            raise ToolServerUnavailable(
                f"tool server {server!r}: no answer to {tool} within {timeout:g}s", server
            ) from None
        except MCPError as e:
            if e.code in _TRANSPORT_CODES:
                why = "timed out" if e.code == mcp_types.REQUEST_TIMEOUT else "connection lost"
                self._lost(session, f"{tool}: {why}")
                raise ToolServerUnavailable(
                    f"tool server {server!r}: {tool} {why}: {e.message}", server
                ) from None
            raise ToolError(f"{tool}: {e.message}") from None
        except ToolError:
            raise
        except Exception as e:  # the transport broke or the server answered garbage
            self._lost(session, f"{type(e).__name__}: {e}")
            raise ToolServerUnavailable(
                f"tool server {server!r}: {tool} failed: {type(e).__name__}: {e}", server
            ) from None
        finally:
            session.in_flight -= 1
            session.last_used = time.monotonic()
        return result_of(result)

    def _trace_meta(self) -> mcp_types.RequestParamsMeta | None:
        if self._trace_headers is None:
            return None
        meta = {k: v for k, v in self._trace_headers().items() if k in TRACE_KEYS}
        return cast(mcp_types.RequestParamsMeta, meta) if meta else None

    # ------------------------------------------------------------------ sessions

    async def _open(self, name: str) -> Session:
        session = self._sessions.get(name)
        if session is not None and session.client is not None and not session.closed:
            return session  # the common case: no lock, no read
        async with self._lock:
            body = self._bodies.get(name)
            if body is None:
                raise ToolServerUnavailable(f"tool server {name!r} is not applied", name)
            spec_hash = body_hash(body)
            session = self._sessions.get(name)
            if session is not None and (session.closed or session.spec_hash != spec_hash):
                self._drop(session)  # changed by an apply, or lost: open anew
                session = None
            if session is None:
                spec = ToolServerResource.model_validate(body).spec
                session = Session(name, spec, spec_hash)
                self._sessions[name] = session
                assert self._tg is not None, "use the pool as an async context manager"
                # In a context of its own: the session serves every agent of the
                # daemon, so it must not keep the first caller's trace span or log
                # attribution (a task copies the context it is started in).
                contextvars.Context().run(self._tg.start_soon, self._serve, session)
        with anyio.move_on_after(session.spec.timeouts.connect + _GRACE_S):
            await session.ready.wait()
        if session.client is None or session.closed:
            why = session.error or f"did not start within {session.spec.timeouts.connect:g}s"
            session.closing.set()
            if self._sessions.get(name) is session:
                del self._sessions[name]
            raise ToolServerUnavailable(f"tool server {name!r}: {why}", name)
        return session

    async def _serve(self, session: Session) -> None:
        """Open the session, keep it until it is closed or lost (this task owns it)."""
        spec = session.spec
        scope = anyio.CancelScope(deadline=anyio.current_time() + spec.timeouts.connect)
        try:
            with scope:
                async with AsyncExitStack() as stack:
                    client = Client(
                        await transport(session, stack, cwd=self.cwd),
                        read_timeout_seconds=spec.timeouts.call,
                        message_handler=message_handler(session),
                        # The initialize handshake: every server speaks it, and its
                        # tools/list_changed notification reaches us (mcp 2.3's listen
                        # streams of 2026-07-28 sessions delivered no change events in
                        # our tests; listen() still uses one where a session is modern).
                        mode="legacy",
                    )
                    await stack.enter_async_context(client)
                    session.client = client
                    self.started += 1
                    await self._list(session)
                    scope.deadline = math.inf
                    session.ready.set()
                    log.info(
                        "tool server %s: open, %d tools", session.name, len(session.tools or ())
                    )
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(listen, session, client)
                        await session.closing.wait()
                        tg.cancel_scope.cancel()
            if scope.cancelled_caught and not session.ready.is_set():
                session.error = f"did not start within {spec.timeouts.connect:g}s"
        except ToolServerUnavailable as e:
            session.error = str(e)
        except Exception as e:  # it does not start, or answers garbage
            session.error = f"could not start: {type(e).__name__}: {first_line(e)}"
            log.warning("tool server %s: %s", session.name, session.error)
        finally:
            if session.error and not session.ready.is_set() and (tail := session.stderr_tail()):
                session.error += f" (its stderr: {tail})"
            session.closed = True
            session.client = None
            session.ready.set()
            if self._sessions.get(session.name) is session:
                del self._sessions[session.name]

    async def _list(self, session: Session) -> None:
        client = session.client
        assert client is not None
        spec = session.spec
        try:
            with anyio.fail_after(spec.timeouts.connect + _GRACE_S):
                listed = await fetch_tools(client)
        except Exception as e:
            self._lost(session, f"listing tools failed: {type(e).__name__}: {first_line(e)}")
            raise ToolServerUnavailable(
                f"tool server {session.name!r}: listing its tools failed: {first_line(e)}",
                session.name,
            ) from None
        session.stale = False
        session.tools = server_tools(session.name, spec, listed)

    def _drop(self, session: Session) -> None:
        session.closing.set()
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]

    def _lost(self, session: Session, why: str) -> None:
        """The session cannot be trusted any more: close it; the next use opens anew
        (unless only one call timed out on a process that is still there)."""
        session.error = why
        log.warning("tool server %s: %s", session.name, why)
        session.closing.set()
        session.closed = True
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]

    async def _reap(self) -> None:
        """Close sessions no agent has used for ``idle_s`` (checked a few times per idle_s)."""
        while True:
            await anyio.sleep(max(0.05, min(30.0, self.idle_s / 4)))
            now = time.monotonic()
            for name, s in list(self._sessions.items()):
                if s.in_flight == 0 and now - s.last_used >= self.idle_s and s.ready.is_set():
                    log.info("tool server %s: idle for %.0fs; closed", name, now - s.last_used)
                    s.closing.set()
                    del self._sessions[name]

    def span_attributes(self, server: str) -> dict[str, Any]:
        """What a call's span says of its session (``mcp.session.id`` where there is one:
        Streamable HTTP sessions have ids, stdio ones do not)."""
        session = self._sessions.get(server)
        return {"mcp.session.id": session.session_id} if session and session.session_id else {}

    def open_sessions(self) -> list[str]:
        """Names of the servers with an open session."""
        return [n for n, s in self._sessions.items() if s.client is not None and not s.closed]


def server_tool(t: ServerTool, pool: ToolServerPool) -> Tool:
    """``t`` as a :class:`Tool` of an agent's toolbox: the model sees ``SERVER__TOOL``,
    agent code may call it ``SERVER.TOOL``; arguments are checked against the server's
    schema before any call."""
    try:
        validator = jsonschema.Draft202012Validator(dict(t.schema))
    except jsonschema.SchemaError:
        validator = None

    def validate(arguments: Mapping[str, Any]) -> dict[str, Any]:
        if validator is not None:
            errors = sorted(validator.iter_errors(dict(arguments)), key=lambda e: list(e.path))
            if errors:
                raise ArgumentsInvalid(
                    "; ".join(
                        f"{'.'.join(str(p) for p in e.path) or '(arguments)'}: {e.message}"
                        for e in errors[:5]
                    )
                )
        return dict(arguments)

    async def call(**arguments: Any) -> Any:
        return await pool.call(t.server, t.name, arguments)

    return Tool(
        fn=call,
        name=model_tool_name(t.server, t.name),
        description=t.description,
        parameters=dict(t.schema),
        timeout_s=None,  # the pool applies the server's call timeout
        idempotent=t.idempotent,
        approval=t.approval,
        arguments_model=None,
        validator=validate,
        qualified_name=t.qualified,
        server=t.server,
        approval_timeout_s=t.approval_timeout_s,
        approval_on_timeout=t.approval_on_timeout,
        span_attributes=lambda: pool.span_attributes(t.server),
    )
