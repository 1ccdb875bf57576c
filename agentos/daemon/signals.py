"""What the fleet tells a daemon: the signal streams, read and acted on at once.

Signals are the fast path: an apply or a delete (reconcile now, look at the due index,
reload the quotas), a daemon that joins, drains or lets agents go (count the daemons
now), an agent that became due, and what is sent to one agent this daemon holds (a
message, a wake, a hibernate, a drop, a cancel, an operator's restart). A signal for an
agent being started is kept for its runner; one for an agent held elsewhere or released
is not this daemon's (the due index brings it here if it should be). A lost signal
delays, never loses, the work: the due index and the inbox sweep find it.
"""

from __future__ import annotations

import anyio

from agentos.daemon.faults import Faults
from agentos.daemon.state import DaemonState
from agentos.daemon.stopping import Stopper
from agentos.governor.evaluator import Evaluator
from agentos.runtime.activation import Activator
from agentos.runtime.activation_start import Starter
from agentos.store import Store, StoreError

__all__ = ["read_signals"]


async def read_signals(
    group: tuple[str, ...],
    *,
    store: Store,
    daemon_id: str,
    retry_max_s: float,
    state: DaemonState,
    activator: Activator,
    evaluator: Evaluator,
    starter: Starter,
    stopper: Stopper,
    faults: Faults,
) -> None:
    """Read one group of signal shards (all of them on one Redis; one on a cluster,
    where a blocking read covers a single slot) and act on each signal, until cancelled."""
    delay = 0.1
    last = None
    while True:
        try:
            if last is None:
                last = await store.signals.last_id(group)
            batch = await store.signals.read(last, block_ms=1000, group=group)
            delay = 0.1
        except StoreError as e:
            faults.store_failed("signals", e, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, retry_max_s)
            continue
        for entry_id, fields in batch:
            last = entry_id
            cmd, agent = fields.get("cmd", ""), fields.get("agent", "")
            runner = state.runners.get(agent)
            if cmd in ("applied", "deleted"):
                state.reconcile_now(peers=True)
                activator.nudge()
                evaluator.nudge()
                state.quota_kick.set()
            elif cmd in ("joined", "draining", "released"):
                # The fleet's daemons changed: count them (and their agents) now, not at
                # the next look.
                if fields.get("daemon") != daemon_id:
                    state.reconcile_now(peers=True)
            elif cmd == "due":
                activator.nudge()
            elif runner is not None and cmd in ("message", "wake", "hibernate"):
                runner.nudge(cmd)
            elif runner is not None and cmd == "drop":
                runner.drop(fields.get("task", ""))
            elif runner is not None and cmd == "restart":
                grace = fields.get("grace", "")
                state.spawn(stopper.operator_restart(agent, float(grace) if grace else None))
            elif runner is not None and cmd == "cancel":
                task, by = fields.get("task", ""), fields.get("by", "")
                runner.cancel(task, by, dropped=fields.get("dropped") == "1")
            elif cmd in ("message", "wake"):
                starter.signal(agent, cmd)  # kept for its runner if it is being started
            # Any other agent is held elsewhere, or released (due: a "due" signal).
