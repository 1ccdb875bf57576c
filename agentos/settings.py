"""One typed settings object, read from flags and the environment once, at the edge.

Nothing below the CLI reads ``os.environ``: the daemon, the client and the runtime are
handed a :class:`Settings`, so tests build one directly and two daemons in one
process can differ.

How many llama.cpp threads to run by default is decided here too
(:func:`default_llama_threads`): from the CPUs this process may use, never
``os.cpu_count()``. On a loaded 2-core machine a llama.cpp server decoded 1.1 tokens/s
with 2 threads and 52 with 1: spin-waiting threads collapse when a core is taken.

A daemon's labels (``site=host-a,region=eu``: which agents it may host, see
:mod:`agentos.core.placement`) come from ``--labels`` or ``AGENTOS_DAEMON_LABELS``
(:func:`daemon_labels`), read here like everything else from the environment.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from agentos.core.placement import HANDOVER_BATCH, SHARE_MARGIN
from agentos.core.routespec import check_labels

__all__ = [
    "LABELS_ENV",
    "DaemonSettings",
    "SecretUnreadable",
    "Settings",
    "check_daemon_id",
    "daemon_labels",
    "default_home",
    "default_llama_threads",
    "llama_threads",
    "new_daemon_id",
    "parse_labels",
    "read_secret",
    "usable_cpus",
]

DAEMON_ID_MAX = 100
# Letters, digits and . _ - @ : only: an id is part of Redis keys (braces would change
# their Cluster hash tag), of lease values ("daemon|token") and of log lines.
_DAEMON_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]*")


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """The agentos home folder: ``$AGENTOS_HOME``, else ``~/.agentos``."""
    env = os.environ if env is None else env
    return Path(env.get("AGENTOS_HOME") or Path.home() / ".agentos").expanduser()


CPU_MAX_FILE = Path("/sys/fs/cgroup/cpu.max")
_UNKNOWN_AFFINITY_CPUS = 2  # where the OS cannot say (no sched_getaffinity): assume few


def usable_cpus(affinity: int, cpu_max: str | None) -> int:
    """The CPUs a process may use: ``affinity`` (``len(os.sched_getaffinity(0))``)
    bounded by the cgroup v2 quota in ``cpu_max`` (the text of ``cpu.max``:
    ``"QUOTA PERIOD"``, ``"max PERIOD"`` for none; None when there is no such file).

    The quota is rounded up (150000/100000 is 2 CPUs); the result is at least 1. Text
    that does not parse bounds nothing.
    """
    cpus = max(1, affinity)
    fields = (cpu_max or "").split()
    if not fields or fields[0] == "max":
        return cpus
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return cpus
    if quota <= 0 or period <= 0:
        return cpus
    return max(1, min(cpus, -(-quota // period)))


def llama_threads(cpus: int) -> int:
    """llama.cpp threads for ``cpus`` usable CPUs: one is left for the daemon (its event
    loop, Redis, agents' code), at least 1."""
    return max(1, cpus - 1)


class SecretUnreadable(ValueError):
    """A secret reference that does not resolve; the message names the variable or the
    file, never a value."""


def read_secret(env: str | None, file: str | None) -> str:
    """The secret in environment variable ``env`` or in ``file`` (stripped), read now and
    never kept: Model credentials and ToolServer env and headers both point at secrets
    this way. Raises :class:`SecretUnreadable` when it is unset, empty or unreadable."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SecretUnreadable(f"environment variable {env} is not set")
        return value
    assert file is not None
    try:
        return Path(file).read_text().strip()
    except OSError as e:
        raise SecretUnreadable(f"cannot read {file}: {e.strerror}") from None


def default_llama_threads() -> int:
    """:func:`llama_threads` for the CPUs this process may use now (reads the affinity
    mask and ``/sys/fs/cgroup/cpu.max``)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        affinity = _UNKNOWN_AFFINITY_CPUS
    try:
        cpu_max: str | None = CPU_MAX_FILE.read_text()
    except OSError:
        cpu_max = None
    return llama_threads(usable_cpus(affinity, cpu_max))


def new_daemon_id() -> str:
    """A daemon id unique across hosts and restarts: host, pid and a random suffix."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60].strip("-.") or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def check_daemon_id(daemon_id: str) -> str:
    """``daemon_id`` if it is a valid daemon id; raises ValueError saying why not."""
    if not daemon_id or len(daemon_id) > DAEMON_ID_MAX or not _DAEMON_ID.fullmatch(daemon_id):
        shown = daemon_id[:DAEMON_ID_MAX].encode("unicode_escape").decode("ascii")
        raise ValueError(
            f"invalid daemon id {shown!r}: use 1 to {DAEMON_ID_MAX} letters, digits and "
            ". _ - @ : (starting with a letter or digit)"
        )
    return daemon_id


LABELS_ENV = "AGENTOS_DAEMON_LABELS"


def parse_labels(text: str, *, what: str = "--labels") -> dict[str, str]:
    """``NAME=VALUE,NAME=VALUE`` as a dict (spaces around a pair or its parts are
    ignored; blank text is no labels). Raises ValueError naming ``what`` and the first
    bad pair: one without ``=`` or a name, a name or value that is not a label
    (letters, digits, ``-_.``; ``/`` too in names), a name given twice."""
    labels: dict[str, str] = {}
    if not text.strip():
        return labels
    for raw in text.split(","):
        pair = raw.strip()
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ValueError(
                f"{what}: {pair!r} is not NAME=VALUE (labels look like site=host-a,region=eu)"
            )
        if key in labels:
            raise ValueError(f"{what}: {pair!r}: label {key} is given twice")
        check_labels({key: value}, f"{what}: {pair!r}")
        labels[key] = value
    return labels


def daemon_labels(flag: str | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A daemon's labels: ``--labels`` when given (``flag``), else
    ``AGENTOS_DAEMON_LABELS``, else none. Raises ValueError (see :func:`parse_labels`)."""
    if flag is not None:
        return parse_labels(flag)
    env = os.environ if env is None else env
    return parse_labels(env.get(LABELS_ENV, ""), what=LABELS_ENV)


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How a daemon runs its fleet. Durations in seconds."""

    daemon_id: str = field(default_factory=new_daemon_id)
    lease_ttl_s: float = 15.0  # another daemon may adopt an agent this long after we die
    reconcile_interval_s: float = 1.0
    status_flush_s: float = 1.0  # how often step counters reach Redis
    grace_s: float = 10.0  # how long agents get to stop on shutdown
    max_agents: int | None = None  # per daemon; None = no limit
    # Daemons sharing a Redis split the agents: each holds at most its fair share
    # ceil(agents / live daemons) plus this fraction of it (at least one more), and hands
    # over at most handover_batch idle agents at once when it holds more.
    share_margin: float = SHARE_MARGIN
    handover_batch: int = HANDOVER_BATCH
    engine: str = "sim"
    engine_options: Mapping[str, object] = field(default_factory=dict)
    redis_retry_max_s: float = 5.0
    inbox_sweep_s: float = 30.0  # look in every inbox this often, in case a signal was lost
    task_retention_count: int = 1000  # task records kept per agent
    task_retention_s: float = 7 * 86400.0  # and for at most this long (idempotency keys too)
    task_trim_interval_s: float = 60.0  # how often the daemon trims its agents' task records
    usage_retention_days: float = 400.0  # a day's usage hash lives this long after its last write
    daemon_forget_after_s: float = 600.0  # a daemon not seen this long leaves the daemons list
    metering_flush_s: float = 30.0  # idle and hibernated agents' usage reaches Redis this often
    quota_eval_s: float = 2.0  # how often the evaluator daemon applies the policies' rules
    quota_window_s: float = 60.0  # fleet metrics (queue wait p95, rates) cover this long
    quota_refresh_s: float = 1.0  # how often each daemon reloads effective limits
    quota_slot_lease_s: float = 30.0  # a dead daemon's concurrency slots return after this
    # An agent running tools this long may lend its engine slot to an agent waiting for
    # one (KV saved, restored for its next model call); see README "Agents with tools".
    lend_slot_after_s: float = 0.5
    # An MCP tool server no agent of this daemon has called for this long is stopped.
    tool_server_idle_s: float = 300.0
    # Isolation (README "Isolation"): the loop beats every loop_beat_s; a beat later than
    # blocked_loop_s means agent code blocked the loop: a BlockedLoop event on that agent,
    # counted toward its crash loop.
    blocked_loop_s: float = 1.0
    loop_beat_s: float = 0.1
    # Which agents it may host (their spec.placement selects on these; a local Model
    # with a site is served by the daemons labelled site=<it>); in its heartbeat.
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_daemon_id(self.daemon_id)
        check_labels(dict(self.labels), "labels")


@dataclass(frozen=True, slots=True)
class Settings:
    """Where Redis is and which namespace of it this fleet uses."""

    # None: the embedded server under ``home``. Out of reprs: it may hold a password.
    redis_url: str | None = field(default=None, repr=False)
    namespace: str = "agentos"
    home: Path = field(default_factory=default_home)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``AGENTOS_REDIS_URL``, ``AGENTOS_NAMESPACE``, ``AGENTOS_HOME``.

        Keyword overrides that are not None win over the environment.
        """
        env = os.environ if env is None else env
        base = cls(
            redis_url=env.get("AGENTOS_REDIS_URL") or None,
            namespace=env.get("AGENTOS_NAMESPACE") or "agentos",
            home=default_home(env),
        )
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **clean)  # type: ignore[arg-type]
