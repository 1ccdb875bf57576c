"""The ``daemon`` and ``up`` commands: their flags, checked before anything starts.

Durations, engine options, retention and ``--http`` (with its bearer token) are
parsed here into :class:`agentos.settings.DaemonSettings` and a
:class:`agentos.cli.serve._Serve` plan, so that a bad flag is exit code 2 and one
sentence, never a half-started daemon. :mod:`agentos.cli.serve` runs the plan.

The engine is chosen here too: ``up`` runs the real model (``llama``) when it is
installed and says so in a warning when it falls back to ``sim``; ``--engine`` forces
one. llama.cpp threads default to the CPUs the process may use
(:func:`agentos.settings.default_llama_threads`), ``--threads`` sets them.

A daemon's labels (``--labels site=host-a,region=eu``, else ``AGENTOS_DAEMON_LABELS``)
say which agents it may host; a pair that does not parse is exit code 2 naming it.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from agentos.cli.common import (
    STATE,
    FilesOpt,
    _fail,
    _run,
    _run_sync_load,
    _setup_logging,
    err,
)
from agentos.cli.serve import _Serve, _serve
from agentos.core.durations import parse_duration
from agentos.engine import llama_missing
from agentos.ingress import is_loopback
from agentos.settings import LABELS_ENV, DaemonSettings, daemon_labels, new_daemon_id


class OtelMode(enum.StrEnum):
    """Where traces and metrics go."""

    auto = "auto"
    console = "console"
    none = "none"


KeepOpt = Annotated[int, typer.Option(min=1, help="Task records kept per agent.")]
MaxAgeOpt = Annotated[
    str, typer.Option(help="Task records and idempotency keys are kept this long.")
]
OtelOpt = Annotated[
    OtelMode,
    typer.Option(help="auto: OTLP when OTEL_EXPORTER_OTLP_* is set; console: stderr; none."),
]
HttpOpt = Annotated[
    str | None,
    typer.Option(help="Serve webhooks and health checks on HOST:PORT (e.g. 127.0.0.1:8080)."),
]
HttpTokenOpt = Annotated[
    Path | None,
    typer.Option(help="File holding the bearer token for --http (or AGENTOS_HTTP_TOKEN)."),
]


AUTO = "auto"
_LOCAL = ("llama", "llamaserver")  # engines that run llama.cpp in (or under) the daemon


def _choose_engine(engine: str, model: Path | None) -> str:
    """``engine``, or for ``auto`` llama when it can run here, else sim with a warning."""
    if engine != AUTO:
        return engine
    missing = llama_missing(model, STATE.settings.home)
    if missing is None:
        err.print("engine: llama, the real model (--engine sim for the simulator)", markup=False)
        return "llama"
    err.print(
        f"warning: running the sim engine (placeholder text, no model) because {missing}; "
        "--engine sim chooses it without this warning",
        markup=False,
    )
    return "sim"


def _engine_options(
    engine: str,
    model: Path | None,
    slots: int | None,
    n_ctx: int | None,
    threads: int | None = None,
) -> dict[str, object]:
    options: dict[str, object] = {}
    if slots is not None:
        options["slots"] = slots
    if engine == "llama":
        options["home"] = STATE.settings.home
        if model is not None:
            options["model_path"] = model
        if n_ctx is not None:
            options["n_ctx"] = n_ctx
    elif model is not None or n_ctx is not None:
        _fail(f"--model and --n-ctx apply to the llama engine, not {engine!r}", 2)
    if threads is not None:
        if engine not in _LOCAL:
            _fail(f"--threads applies to the llama and llamaserver engines, not {engine!r}", 2)
        options["n_threads"] = threads
    return options


def _daemon_settings(
    engine: str,
    max_agents: int | None,
    grace: str,
    daemon_id: str | None,
    lease_ttl: str,
    engine_options: dict[str, object],
    retention: tuple[int, str] = (1000, "7d"),
    labels: str | None = None,
) -> DaemonSettings:
    try:
        chosen = daemon_labels(labels)
    except ValueError as e:
        _fail(str(e), 2)
    values = {}
    keep, max_age = retention
    for flag, text in (("--grace", grace), ("--lease-ttl", lease_ttl), ("--task-max-age", max_age)):
        try:
            values[flag] = parse_duration(text)
        except ValueError as e:
            _fail(f"{flag}: {e}", 2)
    if values["--grace"] >= values["--lease-ttl"]:
        _fail("--grace must be shorter than --lease-ttl", 2)
    try:
        return DaemonSettings(
            daemon_id=daemon_id or new_daemon_id(),
            engine=engine,
            max_agents=max_agents,
            grace_s=values["--grace"],
            lease_ttl_s=values["--lease-ttl"],
            engine_options=engine_options,
            task_retention_count=keep,
            task_retention_s=values["--task-max-age"],
            labels=chosen,
        )
    except ValueError as e:  # a bad --id: one line, exit 2
        _fail(str(e), 2)


EngineOpt = Annotated[
    str,
    typer.Option(
        help="Inference engine: llama (in-process, extra agentos[llama]), llamaserver (embedded "
        "llama.cpp server, extra agentos[server]), sim (placeholder text, no model) or auto "
        "(llama when installed, else sim with a warning)."
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="llama.cpp threads (llama, llamaserver). Default: the CPUs this process may use "
        "(affinity, cgroup quota) less one for the daemon.",
    ),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option(help="GGUF model file (llama). Default: Gemma 3 270M from PyPI, in AGENTOS_HOME."),
]
SlotsOpt = Annotated[
    int | None, typer.Option(min=1, help="Agents holding the model at once (engine slots).")
]
NCtxOpt = Annotated[int | None, typer.Option(min=256, help="Context tokens per agent (llama).")]
GraceOpt = Annotated[str, typer.Option(help="How long agents get to stop on shutdown.")]
LeaseOpt = Annotated[
    str,
    typer.Option(help="Agent lease length: how soon another daemon adopts this one's agents."),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option(
        help="This daemon's labels, NAME=VALUE,... (e.g. site=host-a,region=eu): agents' "
        "spec.placement selects on them, and a local Model with a site is served by the "
        f"daemons labelled site=<it>. Default: ${LABELS_ENV}, else none.",
        show_default=False,
    ),
]


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LogLevel(enum.StrEnum):
    """``--log-level``: what the daemon prints (agents' ctx.log lines at INFO always show
    unless the level is above INFO)."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevelOpt = Annotated[
    LogLevel,
    typer.Option(
        help="What the daemon prints; agents' own lines (ctx.log) show from info unless "
        "this is above warning."
    ),
]


def daemon(
    engine: EngineOpt = "sim",
    model: ModelOpt = None,
    slots: SlotsOpt = None,
    n_ctx: NCtxOpt = None,
    threads: ThreadsOpt = None,
    max_agents: Annotated[
        int | None, typer.Option(min=1, help="Agents this daemon runs at most.")
    ] = None,
    grace: GraceOpt = "10s",
    lease_ttl: LeaseOpt = "15s",
    daemon_id: Annotated[
        str | None, typer.Option("--id", help="Daemon id (default host-pid-random).")
    ] = None,
    http: HttpOpt = None,
    http_token_file: HttpTokenOpt = None,
    otel: OtelOpt = OtelMode.auto,
    task_retention: KeepOpt = 1000,
    task_max_age: MaxAgeOpt = "7d",
    log_level: LogLevelOpt = LogLevel.info,
    labels: LabelsOpt = None,
) -> None:
    """Run a daemon against an existing Redis (several may share one)."""
    _setup_logging(_LEVELS[log_level])
    engine = _choose_engine(engine, model)
    options = _engine_options(engine, model, slots, n_ctx, threads)
    dsettings = _daemon_settings(
        engine,
        max_agents,
        grace,
        daemon_id,
        lease_ttl,
        options,
        (task_retention, task_max_age),
        labels,
    )
    where, token = _http_options(http, http_token_file)
    _run(lambda: _serve(_Serve(dsettings, http=where, http_token=token, otel=otel.value)))


def up(
    files: FilesOpt = [],  # noqa: B006 (typer reads the default)
    engine: EngineOpt = AUTO,
    model: ModelOpt = None,
    slots: SlotsOpt = None,
    n_ctx: NCtxOpt = None,
    threads: ThreadsOpt = None,
    for_: Annotated[
        str | None, typer.Option("--for", help="Stop after this long (e.g. 30s).")
    ] = None,
    until_idle: Annotated[
        bool, typer.Option(help="Stop once nothing is queued or running and no trigger is due.")
    ] = False,
    grace: GraceOpt = "10s",
    lease_ttl: LeaseOpt = "15s",
    table: Annotated[
        bool | None, typer.Option(help="Live table (default: when a terminal).")
    ] = None,
    http: HttpOpt = None,
    http_token_file: HttpTokenOpt = None,
    otel: OtelOpt = OtelMode.auto,
    task_retention: KeepOpt = 1000,
    task_max_age: MaxAgeOpt = "7d",
    log_level: LogLevelOpt = LogLevel.warning,
    labels: LabelsOpt = None,
) -> None:
    """Start Redis (embedded unless --redis), apply -f files and run a daemon in the foreground."""
    duration_s = None
    if for_ is not None:
        try:
            duration_s = parse_duration(for_)
        except ValueError as e:
            _fail(f"--for: {e}", 2)
    docs = _run_sync_load(files) if files else []
    _setup_logging(_LEVELS[log_level])
    engine = _choose_engine(engine, model)
    options = _engine_options(engine, model, slots, n_ctx, threads)
    dsettings = _daemon_settings(
        engine, None, grace, None, lease_ttl, options, (task_retention, task_max_age), labels
    )
    live = sys.stdout.isatty() if table is None else table
    embedded = STATE.settings.redis_url is None
    where, token = _http_options(http, http_token_file)
    opts = _Serve(dsettings, docs, duration_s, until_idle, embedded, live, where, token, otel.value)
    _run(lambda: _serve(opts))


def _http_options(
    http: str | None, token_file: Path | None
) -> tuple[tuple[str, int] | None, str | None]:
    """Parse --http HOST:PORT and find the bearer token (required off loopback)."""
    if http is None:
        return None, None
    host, sep, port = http.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"--http: expected HOST:PORT such as 127.0.0.1:8080, got {http!r}", 2)
    host = host.strip("[]")
    token = os.environ.get("AGENTOS_HTTP_TOKEN") or None
    if token_file is not None:
        try:
            token = token_file.read_text().strip() or None
        except OSError as e:
            _fail(f"--http-token-file: {e}", 2)
    if token is None and not is_loopback(host):
        _fail(
            f"--http {http}: a bearer token is required when listening beyond loopback; "
            "set AGENTOS_HTTP_TOKEN or --http-token-file",
            2,
        )
    return (host, int(port)), token
