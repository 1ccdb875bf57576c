"""The old import path of :mod:`agentos.engine.sim.state` (a ``sim`` session's context
and its KV blob), kept so existing imports go on working."""

from __future__ import annotations

from agentos.engine.sim.state import (
    KV_FORMAT_VERSION,
    MIN_KV_BYTES_PER_TOKEN,
    SimSession,
    SimStats,
    kv_blob,
    kv_problem,
    pack,
)

__all__ = [
    "KV_FORMAT_VERSION",
    "MIN_KV_BYTES_PER_TOKEN",
    "SimSession",
    "SimStats",
    "kv_blob",
    "kv_problem",
    "pack",
]
