"""How the ``llama`` engine picks the next token: greedy, seeded temperature, grammar.

Greedy when ``temperature == 0``; otherwise softmax sampling at that temperature from a
generator seeded afresh for every call, so a call's output is a function of seed,
context and arguments. A grammar (GBNF, or a JSON schema turned into one) constrains
the choice through llama.cpp's grammar sampler: the unconstrained choice is tried
first and the whole vocabulary is masked only when the grammar rejects it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from agentos.core.chat import grammar_safe
from agentos.engine.base import EngineError
from agentos.engine.llama.native import LOG_TAIL, last_llama_error
from agentos.engine.llama.state import Session

__all__ = ["Generation", "Grammar", "Sampler", "check_sampling", "compile_grammar"]

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class Grammar:
    """A llama.cpp grammar sampler, freed with the generation (or when collected)."""

    def __init__(self, vocab: Any, gbnf: str) -> None:
        LOG_TAIL.clear()
        ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not ptr:
            # The parser prints its reason to stderr itself; pass on what the log kept.
            raise EngineError(f"invalid grammar: llama.cpp could not parse it{last_llama_error()}")
        self.ptr: Any = ptr

    def close(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        # Interpreter shutdown may have torn llama_cpp down already.
        with contextlib.suppress(Exception):
            self.close()


@dataclass(slots=True, eq=False)
class Generation:
    """One stream/generate/chat call: its prompt, its limits and its sampler state."""

    session: Session
    prompt: list[int]
    max_tokens: int
    temperature: float
    grammar: Grammar | None
    rng: np.random.Generator | None
    cached_tokens: int
    fed: bool = False  # the prompt has been decoded

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()


def check_sampling(max_tokens: int, temperature: float) -> None:
    """Raise :class:`EngineError` for a negative ``max_tokens`` or a bad temperature."""
    if max_tokens < 0:
        raise EngineError(f"max_tokens must be >= 0, got {max_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise EngineError(f"temperature must be a finite number >= 0, got {temperature}")


def compile_grammar(
    vocab: Any, grammar: str | None, json_schema: Mapping[str, Any] | None
) -> Grammar | None:
    """The grammar sampler for a GBNF ``grammar`` or a ``json_schema`` (None: neither)."""
    if json_schema is not None:
        try:
            grammar = json_schema_to_gbnf(json.dumps(grammar_safe(json_schema)))
        except Exception as exc:  # the converter raises bare Exceptions
            raise EngineError(f"cannot turn json_schema into a grammar: {exc}") from exc
    return Grammar(vocab, grammar) if grammar is not None else None


class Sampler:
    """Draws tokens from logits, with scratch buffers for grammar checks sized once."""

    def __init__(self, n_vocab: int) -> None:
        if ctypes.sizeof(llama_cpp.llama_token_data) != _TOKEN_DATA.itemsize:
            raise EngineError("llama_token_data does not have the expected layout")
        self._n_vocab = n_vocab
        # Scratch for grammar checks: one candidate, or the whole vocabulary.
        self._one = (llama_cpp.llama_token_data * 1)()
        self._cands = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._vocab_ids = np.arange(n_vocab, dtype=np.int32)

    def sample(self, logits: np.ndarray[Any, Any], gen: Generation) -> int:
        """The next token of ``gen`` from the context's ``logits`` (accepted by its
        grammar, which advances)."""
        token = self._draw(logits, gen)
        if gen.grammar is not None and gen.grammar.ptr is not None:
            grammar = gen.grammar.ptr
            if not self._grammar_allows(grammar, token):
                token = self._draw(self._grammar_mask(grammar, logits), gen)
            llama_cpp.llama_sampler_accept(grammar, token)
        return token

    def _draw(self, logits: np.ndarray[Any, Any], gen: Generation) -> int:
        if gen.rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / gen.temperature
        top = float(np.max(scaled))
        if not math.isfinite(top):
            raise EngineError("no token can be sampled (all logits are -inf)")
        probs = np.exp(scaled - top)
        probs /= probs.sum()
        return int(gen.rng.choice(self._n_vocab, p=probs))

    def _grammar_allows(self, grammar: Any, token: int) -> bool:
        one = self._one
        one[0] = llama_cpp.llama_token_data(token, 0.0, 0.0)
        cands = llama_cpp.llama_token_data_array(
            ctypes.cast(one, llama_cpp.llama_token_data_p), 1, -1, False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cands))
        return math.isfinite(cands.data[0].logit)

    def _grammar_mask(self, grammar: Any, logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``logits`` with every token the grammar rejects set to -inf."""
        cands = self._cands
        cands["id"] = self._vocab_ids
        cands["logit"] = logits
        cands["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            cands.ctypes.data_as(llama_cpp.llama_token_data_p), self._n_vocab, -1, False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        masked = np.full(self._n_vocab, -np.inf, dtype=np.float32)
        masked[cands["id"]] = cands["logit"]
        return masked
