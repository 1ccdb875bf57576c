"""The server's slots: which session holds which, and a slot's KV saved to bytes and back.

Each open session holds one slot (``id_slot`` on every request). Hibernating saves the
slot to a file in the server's slot directory (``POST /slots/{id}?action=save``), reads
the bytes and deletes the file; waking writes them back and restores into whatever slot
is free (``action=restore``), checked against the token count the save reported. A
slot a session left is erased before its next use, by whichever call uses it first.
:class:`Conn` is what the engine's calls (:mod:`.text`, :mod:`.chat`, :mod:`.kv`) share.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentos.engine.base import EngineError, NoFreeSlot
from agentos.engine.llamaserver.state import Call, LlamaServerStats, Session
from agentos.engine.remote import RemoteClient, Replica

__all__ = ["Conn", "SlotTable"]

log = logging.getLogger("agentos.engine.llamaserver")


async def _remove(path: Path) -> None:
    """Delete a slot file off the event loop, even while the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))


class SlotTable:
    """Open sessions by id, and the slots to erase before their next use."""

    def __init__(self, call: Call, stats: LlamaServerStats) -> None:
        self._call = call
        self._stats = stats
        self.sessions: dict[str, Session] = {}
        self.dirty: set[tuple[str, int]] = set()  # slots closed since their last use: erase

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise EngineError(f"no open session {session_id!r}")
        return s

    def open(self, session_id: str, replicas: list[Replica], total: int) -> None:
        """Give the session the first free slot of ``replicas`` (in the order given)."""
        if session_id in self.sessions:
            raise EngineError(f"session {session_id!r} is already open")
        taken = {(s.replica.url, s.slot) for s in self.sessions.values()}
        for replica in replicas:
            for slot in range(replica.max_concurrent):
                if (replica.url, slot) not in taken:
                    self.sessions[session_id] = Session(replica, slot)
                    return
        raise NoFreeSlot(f"all {total} llama.cpp server slots are held")

    def close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self.dirty.add((s.replica.url, s.slot))

    def restarted(self) -> None:
        """A new server process: every slot is empty."""
        self.dirty.clear()
        # A copy (one step under the GIL): this runs in a worker thread while the event
        # loop may open or close sessions.
        for s in list(self.sessions.values()):
            s.restored = -1  # nothing restored is in the new server's slots
            s.cold = True

    async def action(
        self, s: Session, session_id: str, action: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        async with self._call(
            session_id, "POST", f"/slots/{s.slot}?action={action}", body or {}, pinned=s.replica
        ) as (_, response):
            return dict(response.json())

    async def clean(self, session_id: str, s: Session) -> None:
        """Erase the session's slot if another session used it last."""
        key = (s.replica.url, s.slot)
        if key in self.dirty:
            await self.action(s, session_id, "erase")
            self.dirty.discard(key)

    async def reset(self, session_id: str, s: Session) -> None:
        s.tokens = []
        s.chat = None
        s.restored = -1
        self.dirty.add((s.replica.url, s.slot))
        await self.clean(session_id, s)

    async def save(self, session_id: str, s: Session, n_tokens: int) -> tuple[bytes, int] | None:
        """The slot's KV bytes and the token count the server saved (``n_tokens`` when it
        does not say); None when the save failed (logged: the caller keeps the token
        history only)."""
        assert s.replica.slot_dir
        filename = f"agentos-{uuid.uuid4().hex}.bin"
        path = Path(s.replica.slot_dir) / filename
        try:
            saved = await self.action(s, session_id, "save", {"filename": filename})
            data = await anyio.to_thread.run_sync(path.read_bytes)  # tens of MB: off the loop
        except (OSError, EngineError) as e:
            log.warning("%s: slot save failed (%s); keeping the token history only", session_id, e)
            return None
        finally:
            await _remove(path)
        self._stats.saves += 1
        return data, int(saved.get("n_saved", n_tokens))

    async def restore(self, session_id: str, s: Session, data: bytes, expected: int) -> int | None:
        """Put ``data`` in the session's slot; the tokens it holds now, or None when the
        server refused the bytes or restored another count than ``expected`` (the slot
        is erased then)."""
        assert s.replica.slot_dir
        filename = f"agentos-{uuid.uuid4().hex}.bin"
        path = Path(s.replica.slot_dir) / filename
        try:
            await anyio.to_thread.run_sync(path.write_bytes, data)
            restored = await self.action(s, session_id, "restore", {"filename": filename})
        except (OSError, EngineError) as e:
            log.warning("%s: slot restore refused: %s", session_id, e)
            self._stats.restore_failures += 1
            self.dirty.add((s.replica.url, s.slot))
            return None
        finally:
            await _remove(path)
        self.dirty.discard((s.replica.url, s.slot))
        s.cold = False
        n = int(restored.get("n_restored", -1))
        if n != expected:
            log.warning(
                "%s: restore put %d tokens in the slot, expected %d", session_id, n, expected
            )
            self._stats.restore_failures += 1
            self.dirty.add((s.replica.url, s.slot))
            await self.clean(session_id, s)
            return None
        return n


@dataclass(slots=True)
class Conn:
    """What the engine's calls share: the request path, the slots and the counters."""

    call: Call
    client: RemoteClient
    slots: SlotTable
    stats: LlamaServerStats
    slot_ctx: int  # tokens per slot, as the server said (0: unknown)
