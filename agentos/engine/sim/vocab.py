"""The ``sim`` engine's tokenizer and its sampler: words and punctuation, drawn by hash.

Text is split into words and punctuation, with spaces and tabs attached to the piece
that follows them and every newline a token of its own; a token id is a blake2b hash of
the piece modulo ``vocab_size``. The continuation is a pure function of the seed and a
digest of the context, so a session that slept continues as one that never did.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

__all__ = ["SimVocab"]

# Newlines stand alone so that a generated "\n" followed by a bare word re-tokenizes to
# the same two tokens; other whitespace rides on the next piece like in BPE vocabularies.
_PIECE_RE = re.compile(r"\n|[^\S\n]*(?:\w+|[^\w\s])|[^\S\n]+")

# The synthetic continuation draws from these; plain lowercase words so output is easy
# to read in traces and can never be mistaken for structured data.
_WORD_TEXT = (
    "the a an and or but if then so because while when where which who what how why "
    "this that these those it its they them their we us our you your he she his her "
    "is are was were be been being have has had do does did will would can could "
    "should may might must shall not no yes all some many few more most less other "
    "same new old good bad big small long short high low early late first last next "
    "time day night year week hour moment world life work home place way thing part "
    "people person agent task plan note idea story word line page book letter list "
    "water fire earth air light dark stone tree river hill road city field garden "
    "house room door window table chair paper glass metal wood cloud rain snow wind "
    "sun moon star sky sea ship train car bird fish horse dog cat mouse bread apple "
    "tea milk salt sugar song voice sound color shape number answer question reason "
    "result change start end side center edge top bottom front back left right "
    "make take give find keep hold bring send read write speak listen watch wait "
    "walk run move turn open close begin finish build break fix learn teach help "
    "call ask tell show try use need want like know think feel see hear seem become "
    "quiet loud warm cold soft hard quick slow bright clear simple strange gentle "
    "careful ready busy free full empty near far always often sometimes never again "
    "still already soon later here there today together alone"
)
_WORDS = _WORD_TEXT.split()
_PERIOD_PER_MILLE = 90
_NEWLINE_PER_MILLE = 25
_MIN_WORDS = 32


def _piece_hash(piece: str) -> int:
    return int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=8).digest(), "little")


class SimVocab:
    """Token ids for text and back, and the token drawn after a context."""

    def __init__(self, *, seed: int, vocab_size: int) -> None:
        """Raises ValueError for a ``vocab_size`` too small for the word list."""
        self._vocab_size = vocab_size
        self._pieces: dict[int, str] = {}
        self._seed_key = hashlib.blake2b(f"sim-seed|{seed}".encode(), digest_size=16).digest()
        self.period = self._register(".")
        self.newline = self._register("\n")
        # Keep only words whose both forms have ids of their own, so every generated token
        # decodes to the piece that was emitted for it.
        self._words: list[tuple[int, str, int, str]] = []
        for word in _WORDS:
            bare, spaced = word, " " + word
            bare_id, spaced_id = self._piece_id(bare), self._piece_id(spaced)
            if bare_id == spaced_id or bare_id in self._pieces or spaced_id in self._pieces:
                continue
            self._pieces[bare_id] = bare
            self._pieces[spaced_id] = spaced
            self._words.append((bare_id, bare, spaced_id, spaced))
        if len(self._words) < _MIN_WORDS:
            raise ValueError(f"vocab_size {vocab_size} is too small for the sim vocabulary")

    def _piece_id(self, piece: str) -> int:
        return _piece_hash(piece) % self._vocab_size

    def _register(self, piece: str) -> int:
        token = self._piece_id(piece)
        self._pieces.setdefault(token, piece)
        return token

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; pieces are remembered so :meth:`decode` can map them back."""
        return [self._register(piece) for piece in _PIECE_RE.findall(text)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``; an id this engine never saw decodes as ``<tok:ID>``."""
        return "".join(self._pieces.get(t, f"<tok:{t}>") for t in token_ids)

    def count(self, text: str) -> int:
        return len(_PIECE_RE.findall(text))

    def draw(self, context_digest: bytes, after_newline: bool) -> tuple[int, str]:
        """The token sampled after a context with this digest: a pure function of both."""
        draw = int.from_bytes(
            hashlib.blake2b(context_digest, key=self._seed_key, digest_size=8).digest(),
            "little",
        )
        roll = draw % 1000
        if roll < _PERIOD_PER_MILLE and not after_newline:
            return self.period, "."
        if roll < _PERIOD_PER_MILLE + _NEWLINE_PER_MILLE and not after_newline:
            return self.newline, "\n"
        bare_id, bare, spaced_id, spaced = self._words[(draw // 1000) % len(self._words)]
        return (bare_id, bare) if after_newline else (spaced_id, spaced)
