"""Hibernating a ``llamaserver`` session: its slot's KV, its history and its conversation.

A snapshot carries the slot's KV bytes when a slot directory is shared (saved and
restored by :class:`~.slots.SlotTable`), the token history and, for a chat session, the
conversation. A restore the server refuses (a corrupt file, another build) returns
False, and the runtime re-prefills from the token history with :func:`prefill`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from agentos.engine.base import EngineError, KVSnapshot
from agentos.engine.llamaserver.chat import rendered_tokens
from agentos.engine.llamaserver.slots import Conn
from agentos.engine.llamaserver.state import ChatState

__all__ = ["export_kv", "fingerprint", "import_kv", "prefill"]

log = logging.getLogger("agentos.engine.llamaserver")


def fingerprint(props: Mapping[str, Any], *, model_id: str, slot_ctx: int, embedded: bool) -> str:
    """What must be equal for a slot file to be restored: the model (its sha256, else
    the path the first server's ``/props`` names), the server build and the slot size;
    an embedded server's cache settings are ours, a remote one's are the server's."""
    parts = {
        "model": model_id or str(props.get("model_path", "")),
        "build": str(props.get("build_info", "")),
        "slot_ctx": slot_ctx,
        "cache": "f16/f16",
        "swa_full": True if embedded else "server",
        "checkpoints": 0 if embedded else "server",
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"llamaserver/{digest}"


async def export_kv(
    conn: Conn, session_id: str, *, fingerprint: str, server_down: bool
) -> KVSnapshot:
    """The slot's KV (when a slot directory is shared), its token history and, for a
    chat session, the conversation (:attr:`KVSnapshot.conversation`).

    A chat session's tokens are its conversation as the server renders and
    tokenizes it: what a re-prefill sends when the KV cannot be used.
    """
    s = conn.slots.get(session_id)
    # A stopped server's slots are gone, and a restarted one's are empty until used.
    cold = s.cold or server_down
    conversation = b""
    if s.chat is not None:
        conversation = s.chat.to_json()
        tokens = tuple(await rendered_tokens(conn, session_id, s, s.chat.lowered))
        s.chat.n_tokens = len(tokens)  # what session_info reports is what was saved
    else:
        tokens = tuple(s.tokens)
    if not s.replica.slot_dir or not tokens or cold:
        # A cold slot holds nothing of the session: its history is all there is.
        return KVSnapshot(fingerprint, tokens, None, conversation=conversation)
    saved = await conn.slots.save(session_id, s, len(tokens))
    if saved is None:
        return KVSnapshot(fingerprint, tokens, None, conversation=conversation)
    data, n_saved = saved
    return KVSnapshot(fingerprint, tokens, data, n_saved, conversation)


async def import_kv(conn: Conn, session_id: str, snapshot: KVSnapshot, *, fingerprint: str) -> bool:
    """Restore the slot from ``snapshot`` into whichever slot the session holds; a
    chat session gets its conversation back too. False when the bytes are unusable."""
    s = conn.slots.get(session_id)
    if snapshot.data is None or snapshot.fingerprint != fingerprint:
        return False
    chat = None
    if snapshot.conversation:
        try:
            chat = ChatState.from_json(snapshot.conversation)
        except ValueError as e:
            log.warning("%s: snapshot's conversation is unusable: %s", session_id, e)
            return False
    if not s.replica.slot_dir:
        return False
    expected = snapshot.n_kv if snapshot.n_kv is not None else len(snapshot.tokens)
    n = await conn.slots.restore(session_id, s, snapshot.data, expected)
    if n is None:
        return False
    if chat is not None:
        chat.n_tokens = len(snapshot.tokens)
        s.tokens, s.chat = [], chat
    else:
        s.tokens, s.chat = list(snapshot.tokens), None
    s.restored = n
    conn.stats.restores += 1
    return True


async def prefill(
    conn: Conn, session_id: str, tokens: Sequence[int], conversation: bytes = b""
) -> float:
    """Put ``tokens`` in the session's slot; with ``conversation`` (a chat session's
    :attr:`KVSnapshot.conversation`) the session continues that chat, whose rendered
    prompt starts with those tokens. Raises :class:`EngineError` for a conversation
    it cannot read (the session is left as it was)."""
    s = conn.slots.get(session_id)
    chat = None
    if conversation:
        try:
            chat = ChatState.from_json(conversation)
        except ValueError as e:
            raise EngineError(f"{session_id}: cannot continue its conversation: {e}") from e
    await conn.slots.clean(session_id, s)
    started = time.perf_counter()
    if tokens:
        body = {"prompt": list(tokens), "n_predict": 0, "id_slot": s.slot, "cache_prompt": True}
        async with conn.call(session_id, "POST", "/completion", body, pinned=s.replica):
            pass
    if chat is not None:
        chat.n_tokens = len(tokens)
        s.tokens, s.chat = [], chat
    else:
        s.tokens, s.chat = list(tokens), None
    s.cold = False
    return time.perf_counter() - started
