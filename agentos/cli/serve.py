"""The process behind ``up`` and ``daemon``: what runs, and in which order it stops.

Embedded Redis (deaf to the terminal's Ctrl-C), the store, the engine, telemetry, the
daemon, the HTTP ingress and the live table or event feed, all under one
:class:`contextlib.AsyncExitStack`, so that the daemon saves its agents before Redis
goes away. Ctrl-C once stops agents gracefully, twice cancels them.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
from rich.live import Live

from agentos.cli.common import STATE, _print_table, check_redis_url, err, out
from agentos.cli.render import _agents_table, _event_line
from agentos.client import Client, ClientError, resolve_redis_url
from agentos.core.spec import Document
from agentos.daemon import Daemon
from agentos.engine import create_engine
from agentos.ingress import build_app
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreUnavailable, redact_url
from agentos.store.embedded import EmbeddedRedis
from agentos.telemetry import Telemetry


@dataclass(frozen=True)
class _Serve:
    """What `up` and `daemon` run: a daemon, and optionally Redis, specs and HTTP ingress."""

    daemon: DaemonSettings
    files: list[Document] = field(default_factory=list)
    duration_s: float | None = None
    until_idle: bool = False
    embedded: bool = False
    live: bool = False
    http: tuple[str, int] | None = None
    http_token: str | None = None
    otel: str = "auto"


async def _serve(opts: _Serve) -> None:
    settings = STATE.settings
    dsettings = opts.daemon
    engine = create_engine(dsettings.engine, **dict(dsettings.engine_options))
    # Agents' entrypoints import relative to where the operator runs agentos.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    async with AsyncExitStack() as stack:
        if opts.embedded:
            server = EmbeddedRedis(settings.home)
            with _deaf_to_ctrl_c():
                url = server.start()
            stack.callback(server.stop)
            shown = redact_url(url)
            err.print(f"embedded Redis at {shown} (data in {server.data_dir})", markup=False)
            settings = replace(settings, redis_url=url)
        else:
            url = resolve_redis_url(settings)
            check_redis_url(url)
        store = await Store.connect(url, namespace=settings.namespace)
        stack.push_async_callback(store.close)
        if opts.files:
            changes = await Client(store).apply(opts.files)
            for c in changes:
                err.print(f"{c.kind.lower()}/{c.name} {c.action}", markup=False)
        telemetry = Telemetry.from_env(opts.otel)
        stack.callback(telemetry.shutdown)
        d = Daemon(store, engine, dsettings, telemetry=telemetry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, d)
            if opts.live:
                tg.start_soon(_live_table, Client(store))
            else:
                tg.start_soon(_print_events, Client(store))
            if opts.http is not None:
                await tg.start(_serve_http, Client(store), d, opts.http, opts.http_token)
            await d.run(until_idle=opts.until_idle, duration_s=opts.duration_s)
            tg.cancel_scope.cancel()
        if opts.live:
            _print_table(_agents_table(await Client(store).agents()))


@contextlib.contextmanager
def _deaf_to_ctrl_c() -> Iterator[None]:
    """Child processes started inside do not stop on the terminal's Ctrl-C.

    Ctrl-C sends SIGINT to the whole foreground process group, so the embedded
    valkey-server used to shut down at once, while the daemon still had agents' state to
    save, leases to release and its heartbeat to remove ("cannot reach Redis"). Started
    with SIGINT blocked (a mask it inherits and never clears), the server stops only when
    `up` stops it with SIGTERM, after the daemon's and the live table's last calls.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


async def _serve_http(
    client: Client,
    d: Daemon,
    where: tuple[str, int],
    token: str | None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    import uvicorn

    app = build_app(
        client, token=token, ready=lambda: d.ready, stopping=lambda: d.stopping, bind=where
    )
    config = uvicorn.Config(
        app, host=where[0], port=where[1], log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    # Signals belong to the daemon (graceful agent shutdown), not to uvicorn.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's answer to a port it cannot bind
            pass
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        # uvicorn exposes readiness as a plain attribute, not an event.
        while not server.started and not stopped.is_set():  # noqa: ASYNC110
            await anyio.sleep(0.02)
        if not server.started:
            raise ClientError(f"--http: cannot listen on {where[0]}:{where[1]}")
        err.print(f"HTTP ingress on http://{where[0]}:{where[1]}", markup=False)
        task_status.started()
        try:
            await stopped.wait()
        finally:
            server.should_exit = True


async def _watch_signals(d: Daemon) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for _ in signals:
            count += 1
            if count == 1:
                err.print("stopping agents (Ctrl-C again to cancel them now)", markup=False)
                d.request_stop()
            else:
                err.print("cancelling agents", markup=False)
                d.force_stop()


async def _live_table(client: Client) -> None:
    with Live(console=out, refresh_per_second=2, transient=True) as view:
        while True:
            with suppress(StoreUnavailable):
                view.update(_agents_table(await client.agents()))
            await anyio.sleep(1)


async def _print_events(client: Client) -> None:
    last = None
    while True:
        try:
            if last is None:
                last = "$"
                recent = await client.store.events.read(None, count=1)
                last = recent[-1].id if recent else "0-0"
            # A log, not a dashboard: on a cluster (16 shards, no blocking read across
            # them) it looks every 2 s, about 13 commands a second instead of 64.
            events = await client.store.events.read(
                None, after_id=last, block_ms=5_000, count=500, poll_s=2.0
            )
            if events:
                last = events[-1].id
                # One print per batch: 10,000 agents starting print 20,000 lines.
                err.print("\n".join(_event_line(e) for e in events), markup=False, highlight=False)
        except StoreUnavailable:
            await anyio.sleep(1)
