"""Tests for SimEngine: the runtime's tests trust it to be deterministic and to hibernate
losslessly, so those properties are pinned here against the Engine contract."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from agentos.engine import (
    Engine,
    EngineError,
    KVSnapshot,
    NoFreeSlot,
    SimEngine,
)
from tests.sim_support import FOLLOW_UP, PROMPT, collect, invoke, opened

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- protocol and identity ----------------------------------------------------------------


def test_satisfies_engine_protocol() -> None:
    engine = SimEngine()
    assert isinstance(engine, Engine)
    assert engine.name == "sim"
    assert engine.model == "sim-1"
    assert engine.slots == 64


def test_fingerprint_is_stable_and_tracks_configuration() -> None:
    base = SimEngine().fingerprint()
    assert base.startswith("sim:")
    assert SimEngine().fingerprint() == base
    # Costs do not change what the KV bytes mean, so they must not change the fingerprint.
    assert SimEngine(prefill_s_per_token=0.5, slots=2).fingerprint() == base
    # Neither do llama's constraints: a like_llama engine reads a plain one's snapshots.
    assert SimEngine(parallel=1, overflow="raise", export_latency_s=0.1).fingerprint() == base
    variants: list[dict[str, object]] = [
        {"seed": 1},
        {"n_ctx": 4096},
        {"kv_bytes_per_token": 1024},
        {"model": "sim-2"},
        {"vocab_size": 50000},
    ]
    for options in variants:
        assert SimEngine(**options).fingerprint() != base, options  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"slots": 0},
        {"n_ctx": 0},
        {"kv_bytes_per_token": 8},
        {"prefill_s_per_token": -1.0},
        {"vocab_size": 10},
        {"parallel": 0},
        {"slots": 2, "parallel": 3},
        {"overflow": "wrap"},
        {"export_latency_s": -0.1},
        {"import_latency_s": float("nan")},
    ],
)
def test_rejects_bad_configuration(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        SimEngine(**options)  # type: ignore[arg-type]


# -- tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("", 0),
        ("hi", 1),
        ("hi there", 2),
        ("Hello, world!", 4),
        ("a\n\nb", 4),
        ("  ", 1),
        ("tab\tand  spaces ", 4),
        ("naïve café", 2),
    ],
)
def test_count_tokens(text: str, n: int) -> None:
    engine = SimEngine()
    assert engine.count_tokens(text) == n
    assert len(engine.encode(text)) == n


@pytest.mark.parametrize(
    "text", ["", "Hello, world!", "a\n\nb  c\t.", "  lead and trail  ", "x\r\ny", "émoji 🎉 ok"]
)
def test_encode_decode_round_trips(text: str) -> None:
    engine = SimEngine()
    ids = engine.encode(text)
    assert engine.decode(ids) == text
    assert all(0 <= t < 32000 for t in ids)
    # Ids are a pure function of the text, not of what the engine saw before.
    assert SimEngine(seed=9).encode(text) == ids


async def test_generated_text_retokenizes_to_the_context() -> None:
    engine = opened()
    done = await engine.generate("s", PROMPT, max_tokens=200)
    context = engine.context_tokens("s")
    assert engine.encode(PROMPT + done.text) == list(context)
    assert engine.decode(context) == PROMPT + done.text


# -- generation ---------------------------------------------------------------------------


async def test_same_seed_and_prompt_give_same_text_across_engines() -> None:
    a, b = opened(), opened()
    first = await a.generate("s", PROMPT, max_tokens=64)
    second = await b.generate("s", PROMPT, max_tokens=64)
    assert first.text == second.text
    assert first.text.strip()
    other = opened(seed=1)
    assert (await other.generate("s", PROMPT, max_tokens=64)).text != first.text


async def test_output_is_plain_words() -> None:
    engine = opened()
    done = await engine.generate("s", PROMPT, max_tokens=300, grammar='root ::= "{"')
    assert set(done.text) <= set("abcdefghijklmnopqrstuvwxyz .\n")


async def test_stream_chunks_concatenate_to_generate_text() -> None:
    engine = opened()
    chunks = await collect(engine, "s", PROMPT, max_tokens=50)
    reference = await opened().generate("s", PROMPT, max_tokens=50)
    assert "".join(c.text for c in chunks) == reference.text
    assert sum(len(c.token_ids) for c in chunks) == reference.output_tokens == 50
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_generate_reports_counts_and_timing() -> None:
    engine = opened()
    done = await engine.generate("s", PROMPT, max_tokens=20)
    assert done.input_tokens == engine.count_tokens(PROMPT)
    assert done.output_tokens == 20
    assert done.finish_reason == "length"
    assert done.cached_tokens == 0
    assert 0 <= done.time_to_first_token_s <= done.duration_s
    assert engine.session_info("s").n_tokens == done.input_tokens + 20
    assert engine.stats.prefill_tokens == done.input_tokens
    assert engine.stats.decode_tokens == 20
    assert engine.stats.generations == 1


@pytest.mark.parametrize("max_tokens", [0, 1, 7])
async def test_max_tokens(max_tokens: int) -> None:
    engine = opened()
    done = await engine.generate("s", PROMPT, max_tokens=max_tokens)
    assert done.output_tokens == max_tokens
    assert done.finish_reason == "length"
    assert (done.text == "") == (max_tokens == 0)


async def test_negative_max_tokens_is_an_error() -> None:
    engine = opened()
    with pytest.raises(EngineError, match="max_tokens"):
        engine.stream("s", PROMPT, max_tokens=-1)


async def stop_cases() -> list[tuple[str, str]]:
    """(stop string, expected text) pairs cut from a free-running continuation."""
    free = (await opened().generate("s", PROMPT, max_tokens=80)).text
    words = free.split(" ")
    one_word = " " + words[3]
    at = free.index(one_word)
    spanning = free[at + len(one_word) - 2 : at + len(one_word) + 3]  # across two tokens
    return [
        (one_word, free[:at]),
        (spanning, free[: free.index(spanning)]),
        (free[:4], ""),
    ]


async def test_stop_strings_cut_before_the_stop_and_are_never_streamed() -> None:
    for stop, expected in await stop_cases():
        engine = opened()
        chunks = await collect(engine, "s", PROMPT, max_tokens=80, stop=["never-there", stop])
        text = "".join(c.text for c in chunks)
        assert text == expected, stop
        assert stop not in text
        assert chunks[-1].finished
        assert chunks[-1].finish_reason == "stop"
        done = await opened().generate("s", PROMPT, max_tokens=80, stop=[stop])
        assert (done.text, done.finish_reason) == (expected, "stop")


async def test_stop_string_that_never_appears_changes_nothing() -> None:
    plain = await opened().generate("s", PROMPT, max_tokens=40)
    # A near miss (a real prefix of the output) is held back, then released intact.
    near_miss = plain.text[:12] + "\x00"
    chunks = await collect(opened(), "s", PROMPT, max_tokens=40, stop=["", "ZZZ", near_miss])
    assert "".join(c.text for c in chunks) == plain.text
    assert sum(len(c.token_ids) for c in chunks) == 40
    assert chunks[-1].finish_reason == "length"


async def test_context_window_drops_oldest_tokens() -> None:
    engine = opened(n_ctx=32)
    await engine.generate("s", PROMPT, max_tokens=100)
    assert engine.session_info("s").n_tokens == 32
    again = await engine.generate("s", "more", max_tokens=5)
    assert again.output_tokens == 5
    assert engine.session_info("s").n_tokens == 32


async def test_reset_session_empties_context_and_restarts_continuation() -> None:
    engine = opened()
    first = await engine.generate("s", PROMPT, max_tokens=30)
    await engine.reset_session("s")
    assert engine.session_info("s").n_tokens == 0
    assert (await engine.generate("s", PROMPT, max_tokens=30)).text == first.text


async def test_costs_are_paid_in_time() -> None:
    engine = opened(prefill_s_per_token=0.002, decode_s_per_token=0.002)
    done = await engine.generate("s", "one two three four five", max_tokens=5)
    assert done.time_to_first_token_s >= 5 * 0.002 + 0.002
    assert done.duration_s >= 10 * 0.002
    took = await engine.prefill("s", engine.encode(" six seven eight nine ten"))
    assert took >= 5 * 0.002


# -- sessions and slots -------------------------------------------------------------------


def test_slots_exhausted_then_freed_on_close() -> None:
    engine = SimEngine(slots=2)
    engine.open_session("a")
    engine.open_session("b")
    with pytest.raises(NoFreeSlot):
        engine.open_session("c")
    engine.close_session("a")
    assert not engine.has_session("a")
    engine.open_session("c")
    assert engine.has_session("c")


def test_open_twice_is_an_error_but_not_no_free_slot() -> None:
    engine = opened("a")
    with pytest.raises(EngineError, match="already open") as info:
        engine.open_session("a")
    assert not isinstance(info.value, NoFreeSlot)


def test_close_unknown_session_is_a_noop() -> None:
    SimEngine().close_session("ghost")


UNKNOWN_SESSION_CALLS: list[tuple[str, Callable[[SimEngine], Awaitable[object] | object]]] = [
    ("session_info", lambda e: e.session_info("ghost")),
    ("stream", lambda e: e.stream("ghost", "hi")),
    ("generate", lambda e: e.generate("ghost", "hi")),
    ("reset_session", lambda e: e.reset_session("ghost")),
    ("export_kv", lambda e: e.export_kv("ghost")),
    ("import_kv", lambda e: e.import_kv("ghost", KVSnapshot(e.fingerprint(), (), b""))),
    ("prefill", lambda e: e.prefill("ghost", [1, 2])),
    ("chat", lambda e: e.chat("ghost", [{"role": "user", "content": "hi"}])),
    ("conversation", lambda e: e.conversation("ghost")),
]


@pytest.mark.parametrize(
    "call", [c for _, c in UNKNOWN_SESSION_CALLS], ids=[n for n, _ in UNKNOWN_SESSION_CALLS]
)
async def test_unknown_session_errors_name_it(
    call: Callable[[SimEngine], Awaitable[object] | object],
) -> None:
    with pytest.raises(EngineError, match="ghost"):
        await invoke(SimEngine(), call)


# -- KV export / import -------------------------------------------------------------------


async def test_kv_bytes_are_proportional_to_context_length() -> None:
    engine = opened(kv_bytes_per_token=256)
    empty = await engine.export_kv("s")
    assert empty.tokens == ()
    assert empty.data == b""
    for prompt in ("one", " two three", " four five six seven"):
        await engine.generate("s", prompt, max_tokens=3)
        info = engine.session_info("s")
        snap = await engine.export_kv("s")
        assert info.kv_bytes == 256 * info.n_tokens
        assert snap.data is not None
        assert len(snap.data) == info.kv_bytes
        assert len(snap.tokens) == info.n_tokens
        assert snap.fingerprint == engine.fingerprint()


async def test_hibernated_session_continues_like_one_that_never_slept() -> None:
    awake = opened()
    await awake.generate("s", PROMPT, max_tokens=40)
    expected = await awake.generate("s", FOLLOW_UP, max_tokens=40)

    engine = opened()
    await engine.generate("s", PROMPT, max_tokens=40)
    snap = await engine.export_kv("s")
    engine.close_session("s")
    engine.open_session("s")
    assert await engine.import_kv("s", snap)
    assert engine.session_info("s").n_tokens == len(snap.tokens)
    assert (await engine.generate("s", FOLLOW_UP, max_tokens=40)).text == expected.text
    assert engine.stats.exports == 1
    assert engine.stats.imports_accepted == 1
    assert engine.stats.imports_rejected == 0

    # A snapshot moves between engines with the same fingerprint.
    other = opened("elsewhere")
    assert await other.import_kv("elsewhere", snap)
    assert (await other.generate("elsewhere", FOLLOW_UP, max_tokens=40)).text == expected.text


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


CORRUPTIONS: list[tuple[str, Callable[[KVSnapshot], KVSnapshot]]] = [
    ("wrong fingerprint", lambda s: dataclasses.replace(s, fingerprint="sim:0000000000000000")),
    ("data none", lambda s: dataclasses.replace(s, data=None)),
    ("truncated", lambda s: dataclasses.replace(s, data=(s.data or b"")[:-1])),
    ("empty data", lambda s: dataclasses.replace(s, data=b"")),
    ("flipped header byte", lambda s: dataclasses.replace(s, data=_flip(s.data or b"", 3))),
    ("flipped count byte", lambda s: dataclasses.replace(s, data=_flip(s.data or b"", 24))),
    ("flipped body byte", lambda s: dataclasses.replace(s, data=_flip(s.data or b"", 5000))),
    ("flipped last byte", lambda s: dataclasses.replace(s, data=_flip(s.data or b"", -1))),
    (
        "token changed",
        lambda s: dataclasses.replace(s, tokens=(s.tokens[0] ^ 1, *s.tokens[1:])),
    ),
    ("tokens reordered", lambda s: dataclasses.replace(s, tokens=s.tokens[::-1])),
    ("token dropped", lambda s: dataclasses.replace(s, tokens=s.tokens[:-1])),
    ("token out of vocabulary", lambda s: dataclasses.replace(s, tokens=(10**9, *s.tokens[1:]))),
]


@pytest.mark.parametrize("corrupt", [c for _, c in CORRUPTIONS], ids=[n for n, _ in CORRUPTIONS])
async def test_corrupt_snapshot_is_rejected_and_prefill_recovers(
    corrupt: Callable[[KVSnapshot], KVSnapshot],
) -> None:
    awake = opened()
    await awake.generate("s", PROMPT, max_tokens=20)
    expected = await awake.generate("s", FOLLOW_UP, max_tokens=20)

    engine = opened()
    await engine.generate("s", PROMPT, max_tokens=20)
    good = await engine.export_kv("s")
    engine.close_session("s")
    engine.open_session("s")

    assert await engine.import_kv("s", corrupt(good)) is False
    assert engine.session_info("s").n_tokens == 0
    assert engine.stats.imports_rejected == 1
    assert engine.stats.last_reject_reason

    took = await engine.prefill("s", good.tokens)
    assert took >= 0
    assert engine.session_info("s").n_tokens == len(good.tokens)
    assert (await engine.generate("s", FOLLOW_UP, max_tokens=20)).text == expected.text


async def test_snapshot_from_another_configuration_is_rejected() -> None:
    source = opened(seed=1)
    await source.generate("s", PROMPT, max_tokens=10)
    snap = await source.export_kv("s")
    target = opened()
    # Even with the fingerprint forged, the bytes carry the writer's identity.
    forged = dataclasses.replace(snap, fingerprint=target.fingerprint())
    assert await target.import_kv("s", forged) is False
    assert target.session_info("s").n_tokens == 0


async def test_import_into_non_empty_session_is_an_error() -> None:
    engine = opened()
    await engine.generate("s", PROMPT, max_tokens=5)
    snap = await engine.export_kv("s")
    with pytest.raises(EngineError, match="not empty"):
        await engine.import_kv("s", snap)


async def test_prefill_rejects_out_of_vocabulary_ids() -> None:
    engine = opened()
    with pytest.raises(EngineError, match="vocabulary"):
        await engine.prefill("s", [1, -1])
    assert engine.session_info("s").n_tokens == 0
