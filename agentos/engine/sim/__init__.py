"""A deterministic engine with no model, so the runtime can be tested and demoed without a GPU.

``SimEngine`` meets the :class:`~agentos.engine.base.Engine` contract for real: it
tokenizes, keeps a per-session context, streams a continuation, charges optional
prefill/decode time, and exports KV bytes that :meth:`SimEngine.import_kv` verifies
byte for byte. What it generates is nonsense made of plain English words, but it is
*reproducible* nonsense: the continuation is a pure function of the engine's seed and
the session's current context tokens. A session that was hibernated (exported,
closed, reopened, imported or re-prefilled) therefore continues exactly like one that
never slept, which is the property the runtime's tests lean on.

Behaviour callers should know:

* Tokens: text is split into words and punctuation, with spaces and tabs attached to
  the piece that follows them and every newline a token of its own; a token id is a
  blake2b hash of the piece modulo ``vocab_size``. ``decode(encode(text)) == text``
  for generated text always, and for any other text unless two of its pieces collide
  (decode then returns the first piece registered under the id).
* ``temperature`` is ignored: sampling is always the deterministic draw described above.
* ``grammar`` is accepted and ignored; the output is always plain words, ``.`` and
  newlines, so a caller that asked for a grammar must not expect it to be honoured here.
* Stop strings are never emitted; the tokens sampled up to and including the one that
  completed a stop string stay in the context (as in llama.cpp), and count as output.
* ``overflow="slide"`` (the default): when the context would exceed ``n_ctx`` the
  oldest tokens are dropped (a sliding window); the continuation then depends on the
  window only. ``overflow="raise"`` behaves like llama.cpp: a prompt or prefill that does
  not fit (a prompt with room for one generated token) raises :class:`ContextOverflow`
  and leaves the session unchanged; a generation that fills the session ends with
  ``finish_reason == "length"``.
* ``parallel=None`` (the default): every session may run a call at once and nothing is
  checked. ``parallel=N`` behaves like llama.cpp's one context under one lock (N=1):
  at most N calls do engine work at a time, the others wait their turn step by step
  (prefill, each token, export, import, reset), and a second call on a session that
  already has one in flight raises :class:`EngineError` instead of interleaving
  tokens into one context as llama.cpp would; a call whose session was closed under it
  raises too. A stream holds its session from its first ``anext`` until it finishes
  or is closed.
* ``export_latency_s`` / ``import_latency_s`` are slept by every export / import, so
  hibernation and wake cost time as llama.cpp's do. :meth:`SimEngine.like_llama` sets
  all of the above as the llama engine has them.

Stricter defaults would make most runtime tests slower without testing more; tests of
slot pressure, overflow and hibernation timing should use ``SimEngine.like_llama()``.
The package, by job: :mod:`.engine` (the Engine calls), :mod:`.vocab` (tokens and
the draw), :mod:`.turns` (llama's limits), :mod:`.chat` (chat, scripted replies and the
chat state a snapshot carries) and :mod:`.state` (a session's context and its KV blob).
"""

from __future__ import annotations

from agentos.engine.sim.chat import Scripted
from agentos.engine.sim.engine import SimEngine
from agentos.engine.sim.state import SimStats
from agentos.engine.sim.turns import Overflow

__all__ = ["Overflow", "Scripted", "SimEngine", "SimStats"]
