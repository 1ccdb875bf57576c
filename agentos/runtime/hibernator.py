"""Moves an agent's context between its engine session and Redis: export and save, load and restore.

Saving exports the session's KV, decides whether the bytes are worth keeping
(``keepKV``, from the bandwidth and prefill speed measured so far) and commits the
snapshot under the agent's lease. Restoring loads the snapshot and follows
:func:`agentos.core.hibernation.plan_wake`: import the KV when it verifies and matches
the engine, else re-prefill from the token history, else start empty; it never
raises for a bad snapshot, it says why it took the path it took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agentos.core.hibernation import CostMeter, decide_keep_kv, plan_wake
from agentos.engine.base import Engine, EngineError
from agentos.runtime import kvsnapshots
from agentos.runtime.writer import LeaseLost, Writer

__all__ = ["Hibernator", "Restored", "Saved"]


@dataclass(frozen=True, slots=True)
class Saved:
    """A committed snapshot: status fields for the agent and a one-line detail."""

    status: dict[str, object]
    detail: str
    stored_bytes: int
    n_tokens: int


@dataclass(frozen=True, slots=True)
class Restored:
    """How a context came back: ``restore`` (KV), ``recompute`` (re-prefill) or ``empty``."""

    path: str
    why: str
    nbytes: int
    n_tokens: int
    seconds: float = 0.0


class Hibernator:
    """Export/save and load/restore for the agents of one daemon (one engine)."""

    def __init__(self, engine: Engine, meter: CostMeter | None = None) -> None:
        self.engine = engine
        self.meter = meter or CostMeter()  # store bandwidth and prefill speed, as measured

    async def save(self, writer: Writer, keep_kv: str) -> Saved:
        """Export ``writer``'s agent's session and commit it as its snapshot.

        Raises :class:`LeaseLost` when the lease is gone and :class:`EngineError` when
        the engine cannot export.
        """
        name = writer.name
        snapshot = await self.engine.export_kv(name)
        nbytes, n_tokens = len(snapshot.data or b""), len(snapshot.tokens)
        decision = decide_keep_kv(
            keep_kv,
            nbytes,
            n_tokens,
            read_bps=self.meter.read_bps,
            prefill_tps=self.meter.prefill_tps,
        )
        saved = await writer.call(
            lambda: kvsnapshots.save_snapshot(
                writer.store.snapshots,
                name,
                writer.lease_value,
                snapshot,
                keep_kv=decision.keep,
                reason=decision.reason,
            ),
            "save snapshot",
        )
        if saved is None:
            raise LeaseLost(name)
        self.meter.observe_write(saved.manifest.total_bytes, saved.seconds)
        stored = saved.manifest.total_bytes
        if decision.keep:
            detail = f"{stored} KV bytes, {n_tokens} tokens, {decision.reason}"
        elif n_tokens or not snapshot.conversation:
            detail = f"token history only ({n_tokens} tokens), {decision.reason}"
        else:  # a remote server's session: the conversation is all there is to keep
            detail = f"conversation only ({len(snapshot.conversation)} bytes)"
        status: dict[str, object] = {
            "kv_bytes": stored,
            "kv_tokens": n_tokens,
            "kv_kept": int(decision.keep),
            "snapshot_at": repr(saved.manifest.created_at),
        }
        return Saved(status, detail, stored, n_tokens)

    async def restore(self, writer: Writer) -> Restored:
        """Bring the agent's stored context into its open, empty session. Never raises
        for a missing or unusable snapshot; the result says which path was taken."""
        name = writer.name
        started = time.perf_counter()
        loaded = await writer.call(
            lambda: kvsnapshots.load_snapshot(writer.store.snapshots, name), "load snapshot"
        )
        snapshot = loaded.snapshot
        plan = plan_wake(
            has_kv=snapshot is not None and snapshot.data is not None,
            snapshot_fingerprint=snapshot.fingerprint if snapshot is not None else None,
            engine_fingerprint=self.engine.fingerprint(),
            n_tokens=len(loaded.tokens),
            reason=loaded.reason,
        )
        why = plan.reason
        if plan.try_restore and snapshot is not None:
            try:
                ok = await self.engine.import_kv(name, snapshot)
            except EngineError as e:
                ok, why = False, f"engine refused the KV: {e}"
            else:
                why = "KV restored" if ok else "KV rejected by the engine"
            if ok:
                self.meter.observe_read(loaded.nbytes, loaded.seconds)
                n = len(snapshot.tokens)
                return Restored(
                    "restore",
                    f"{why} ({loaded.nbytes} bytes, {n} tokens)",
                    loaded.nbytes,
                    n,
                    time.perf_counter() - started,
                )
            await self.engine.reset_session(name)
        if not loaded.tokens and not loaded.conversation:
            return Restored(
                "empty",
                f"{why}; context starts empty",
                loaded.nbytes,
                0,
                time.perf_counter() - started,
            )
        try:
            seconds = await self.engine.prefill(name, loaded.tokens, loaded.conversation)
        except EngineError as e:
            await self.engine.reset_session(name)
            return Restored(
                "empty",
                f"{why}; re-prefill failed ({e}); context starts empty",
                loaded.nbytes,
                0,
                time.perf_counter() - started,
            )
        if loaded.tokens:
            self.meter.observe_prefill(len(loaded.tokens), seconds)
        done = (
            f"re-prefilled {len(loaded.tokens)} tokens"
            if loaded.tokens
            else "conversation restored, resent with the next call"
        )
        return Restored(
            "recompute",
            f"{why}; {done}",
            loaded.nbytes,
            len(loaded.tokens),
            time.perf_counter() - started,
        )
