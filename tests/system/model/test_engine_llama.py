"""Tests for LlamaEngine with the real Gemma 3 270M model, assembled from PyPI in the test.

The runtime hibernates agents by exporting a session's KV and importing it later, maybe
into another slot; these tests pin that a woken session continues exactly like one that
never slept, that every unusable snapshot is refused without harming the session, and
that sessions sharing the one llama.cpp context do not disturb each other. Generations
are kept short: the whole module must stay within about 90 s on two cores.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from agentos.core.chat import grammar_safe
from agentos.engine import (
    BACKENDS,
    Engine,
    EngineError,
    KVSnapshot,
    NoFreeSlot,
    StreamChunk,
    create_engine,
)
from agentos.engine.llama import LlamaEngine, default_model_path

pytestmark = pytest.mark.anyio

SLOTS = 4
N_CTX = 4096
PROMPT = "The capital of France is Paris. The capital of Germany is"
FOLLOW_UP = "\nIn short, the next step is"


def history(days: int) -> str:
    return " ".join(
        f"Day {i}: the agent read report {i}, filed note {i * 7 % 13}, and waited."
        for i in range(1, days + 1)
    )


# ~300 tokens: with what is generated on top it stays inside Gemma's 512-token sliding
# window, where an imported session continues bit-identically (see test_long_history).
SHORT = history(15)
# ~660 tokens: crosses the sliding window and spans two prefill chunks of 512.
LONG = history(32)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agentos-home")


@pytest.fixture(scope="module")
def engine(home: Path) -> Iterator[LlamaEngine]:
    # No model_path: the default model is assembled under the temporary home.
    eng = LlamaEngine(home=home, slots=SLOTS, n_ctx=N_CTX)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def sessions(engine: LlamaEngine) -> Iterator[Callable[[str], str]]:
    """Open sessions by name; every one is closed after the test so slots stay free."""
    opened: list[str] = []

    def open_(name: str) -> str:
        engine.open_session(name)
        opened.append(name)
        return name

    yield open_
    for name in opened:
        engine.close_session(name)


@dataclass(frozen=True)
class Reference:
    snapshot: KVSnapshot  # taken with nothing pending, so export changed nothing
    continuation: str  # what the never-exported session then said to FOLLOW_UP
    slot: int  # where it lived


@pytest.fixture(scope="module")
async def reference(engine: LlamaEngine) -> Reference:
    engine.open_session("ref")
    try:
        await engine.generate("ref", SHORT, max_tokens=8)
        # max_tokens=0 decodes the token sampled last together with this prompt, so the
        # snapshot holds everything and a woken session decodes the same batches next.
        await engine.generate("ref", " Then", max_tokens=0)
        snapshot = await engine.export_kv("ref")
        done = await engine.generate("ref", FOLLOW_UP, max_tokens=16)
        slot = engine.slot_of("ref")
    finally:
        engine.close_session("ref")
    assert 256 < len(snapshot.tokens) < 512 - 32
    assert done.output_tokens == 16
    return Reference(snapshot, done.text, slot)


async def collect(
    engine: LlamaEngine, session: str, prompt: str, **kw: object
) -> list[StreamChunk]:
    return [chunk async for chunk in engine.stream(session, prompt, **kw)]  # type: ignore[arg-type]


# -- identity, model file, configuration --------------------------------------------------


def test_satisfies_engine_protocol(engine: LlamaEngine, home: Path) -> None:
    assert isinstance(engine, Engine)
    assert engine.name == "llama"
    assert engine.model == "gemma-3-270m-q4_k_m"
    assert engine.slots == SLOTS
    assert engine.n_ctx == N_CTX
    assert BACKENDS["llama"] == "agentos.engine.llama:LlamaEngine"
    assert engine.fingerprint().startswith("llama:gemma-3-270m-q4_k_m:")
    assert engine.fingerprint() == engine.fingerprint()
    # Assembled through a temporary name: only the model and its digest sidecar remain.
    model = default_model_path(home)
    assert model.stat().st_size == 253_113_024
    assert sorted(p.name for p in model.parent.iterdir()) == [
        model.name,
        model.name + ".sha256.json",
    ]


def test_missing_or_invalid_model_path_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        LlamaEngine(model_path=tmp_path / "missing.gguf")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(EngineError, match="not a GGUF"):
        LlamaEngine(model_path=bogus)


def test_bad_options_are_value_errors(home: Path) -> None:
    for options in ({"slots": 0}, {"n_ctx": 0}, {"n_batch": 0}):
        with pytest.raises(ValueError):  # noqa: PT011
            LlamaEngine(home=home, **options)  # type: ignore[arg-type]


async def test_create_engine_by_name_and_small_context(home: Path) -> None:
    small = create_engine("llama", home=home, slots=1, n_ctx=64, n_threads=1)
    assert isinstance(small, LlamaEngine)
    try:
        assert small.fingerprint() != ""
        assert small.model == "gemma-3-270m-q4_k_m"
        small.open_session("s")
        with pytest.raises(NoFreeSlot):
            small.open_session("t")
        prompt = " ".join(["word"] * 56)
        n_prompt = small.count_tokens(prompt) + 1  # BOS
        done = await small.generate("s", prompt, max_tokens=50)
        # The session filled up: the generation ends as "length", nothing is shifted out.
        assert done.finish_reason == "length"
        assert done.output_tokens == 64 - n_prompt
        assert small.session_info("s").n_tokens == 64
        with pytest.raises(EngineError, match="context overflow"):
            await small.generate("s", " more", max_tokens=1)
        # A full session still exports, and the bytes bring it back.
        snapshot = await small.export_kv("s")
        assert len(snapshot.tokens) == 64
        small.close_session("s")
        small.open_session("s")
        assert await small.import_kv("s", snapshot)
    finally:
        small.close()
    with pytest.raises(EngineError, match="closed"):
        small.open_session("x")
    with pytest.raises(EngineError, match="bad options"):
        create_engine("llama", home=home, slots=0)


# -- tokenizer ----------------------------------------------------------------------------


def test_count_tokens_and_round_trip(engine: LlamaEngine) -> None:
    assert engine.count_tokens("") == 0
    assert engine.count_tokens(PROMPT) == len(engine.encode(PROMPT)) > 5
    text = "Hello, world! naïve café 🎉\n  indented"
    assert engine.decode(engine.encode(text)) == text
    # Control tokens in a prompt are parsed, so chat templates work.
    assert engine.count_tokens("<start_of_turn>user\n") == 3


# -- sessions -----------------------------------------------------------------------------


async def test_sessions_and_slots(engine: LlamaEngine, sessions: Callable[[str], str]) -> None:
    names = [sessions(f"s{i}") for i in range(SLOTS)]
    assert sorted(engine.slot_of(n) for n in names) == list(range(SLOTS))
    with pytest.raises(NoFreeSlot):
        engine.open_session("one-too-many")
    with pytest.raises(EngineError, match="already open"):
        engine.open_session("s0")
    with pytest.raises(EngineError, match="unknown session"):
        engine.session_info("nobody")
    with pytest.raises(EngineError, match="unknown session"):
        await engine.export_kv("nobody")
    engine.close_session("nobody")  # a no-op
    assert engine.session_info("s0").n_tokens == 0
    await engine.generate("s0", PROMPT, max_tokens=2)
    info = engine.session_info("s0")
    assert info.n_tokens == engine.count_tokens(PROMPT) + 1 + 2
    assert info.kv_bytes > 0
    await engine.reset_session("s0")
    assert engine.session_info("s0") == dataclasses.replace(info, n_tokens=0, kv_bytes=0)


async def test_empty_prompt_and_overflow_are_errors(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    s = sessions("s")
    with pytest.raises(EngineError, match="empty"):
        engine.stream(s, "")
    with pytest.raises(EngineError, match="max_tokens"):
        engine.stream(s, PROMPT, max_tokens=-1)
    huge = "lorem ipsum " * 2500
    assert engine.count_tokens(huge) > N_CTX
    with pytest.raises(EngineError, match="context overflow"):
        await engine.generate(s, huge)
    with pytest.raises(EngineError, match="context overflow"):
        await engine.prefill(s, engine.encode(huge))
    with pytest.raises(EngineError, match="vocabulary"):
        await engine.prefill(s, [-1])
    # Nothing of the refused calls reached the session.
    assert engine.session_info(s).n_tokens == 0


# -- generation ---------------------------------------------------------------------------


async def test_greedy_is_deterministic_across_sessions(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    a, b = sessions("a"), sessions("b")
    first = await engine.generate(a, PROMPT, max_tokens=12)
    second = await engine.generate(b, PROMPT, max_tokens=12)
    assert first.text == second.text
    assert "Berlin" in first.text
    assert first.input_tokens == engine.count_tokens(PROMPT) + 1  # BOS
    assert first.output_tokens == 12
    assert first.finish_reason == "length"
    assert 0 < first.time_to_first_token_s <= first.duration_s
    assert first.cached_tokens == 0
    again = await engine.generate(a, FOLLOW_UP, max_tokens=2)
    assert again.input_tokens == engine.count_tokens(FOLLOW_UP)
    assert again.cached_tokens == first.input_tokens + 12


async def test_temperature_sampling_is_seeded(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    a, b = sessions("a"), sessions("b")
    first = await engine.generate(a, PROMPT, max_tokens=10, temperature=0.9)
    second = await engine.generate(b, PROMPT, max_tokens=10, temperature=0.9)
    assert first.text == second.text
    assert first.output_tokens == 10


async def test_stream_equals_generate(engine: LlamaEngine, sessions: Callable[[str], str]) -> None:
    a, b = sessions("a"), sessions("b")
    chunks = await collect(engine, a, PROMPT, max_tokens=12)
    done = await engine.generate(b, PROMPT, max_tokens=12)
    assert "".join(c.text for c in chunks) == done.text
    assert sum(len(c.token_ids) for c in chunks) == done.output_tokens == 12
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == "length"
    assert engine.decode([t for c in chunks for t in c.token_ids]) == done.text


async def test_stop_strings_are_not_emitted(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    a, b = sessions("a"), sessions("b")
    free = (await engine.generate(a, PROMPT, max_tokens=12)).text
    word = " " + free.split()[1]  # cut where the second word starts, whatever it is
    chunks = await collect(engine, b, PROMPT, max_tokens=12, stop=[word, "never-seen"])
    text = "".join(c.text for c in chunks)
    assert text == free[: free.index(word)]
    assert chunks[-1].finished
    assert chunks[-1].finish_reason == "stop"
    # The tokens that completed the stop string stay in the context.
    held = engine.session_info(b).n_tokens - engine.count_tokens(PROMPT) - 1
    assert held == sum(len(c.token_ids) for c in chunks) > 0


async def test_grammar_constrains_output(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    s = sessions("s")
    done = await engine.generate(
        s, "Q: Is the sky blue? Answer yes or no.\nA:", grammar='root ::= " yes" | " no"'
    )
    assert done.text in {" yes", " no"}
    assert done.finish_reason == "stop"  # the grammar was complete, so EOS came next


async def test_json_schema_output_parses(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    s = sessions("s")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    done = await engine.generate(
        s, PROMPT + " Berlin.\nAs JSON:", max_tokens=32, json_schema=schema
    )
    value = json.loads(done.text)
    assert set(value) == {"city"}
    assert isinstance(value["city"], str)


async def test_a_schema_with_huge_bounds_is_constrained_not_a_crash(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    # llama.cpp nests one rule per allowed character: a file tool's maxLength of 100,000
    # crashed the process (engine, daemon and every agent) before bounds were cut.
    s = sessions("s")
    schema = {
        "type": "object",
        "properties": {
            "content": {"type": "string", "maxLength": 100_000},
            "lines": {"type": "array", "items": {"type": "string"}, "maxItems": 10_000},
        },
        "required": ["content"],
    }
    done = await engine.generate(s, PROMPT + "\nAs JSON:", max_tokens=24, json_schema=schema)
    assert done.text.startswith("{")


def test_grammar_bounds_are_cut_and_others_kept() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 100_000, "minLength": 2},
            "b": {"type": "array", "maxItems": 500, "items": {"maxLength": 9}},
        },
    }
    safe = grammar_safe(schema)
    assert safe["properties"]["a"] == {"type": "string", "maxLength": 512, "minLength": 2}
    assert safe["properties"]["b"]["maxItems"] == 64
    assert safe["properties"]["b"]["items"] == {"maxLength": 9}
    assert schema["properties"]["a"]["maxLength"] == 100_000  # a copy


async def test_invalid_grammar_is_an_engine_error(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    s = sessions("s")
    with pytest.raises(EngineError, match="invalid grammar"):
        engine.stream(s, PROMPT, grammar="root ::= (")
    with pytest.raises(EngineError, match="either grammar or json_schema"):
        engine.stream(s, PROMPT, grammar='root ::= "x"', json_schema={"type": "string"})
    assert engine.session_info(s).n_tokens == 0


async def test_interleaved_sessions_do_not_disturb_each_other(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    turns = {"x": [PROMPT, FOLLOW_UP], "y": ["Once upon a time", " The end of the"]}
    alone: dict[str, list[str]] = {}
    for name, prompts in turns.items():
        sessions(name)
        alone[name] = [(await engine.generate(name, p, max_tokens=8)).text for p in prompts]
        engine.close_session(name)

    # Turn by turn, alternating sessions.
    sessions("x2")
    sessions("y2")
    for i in range(2):
        for name in ("x", "y"):
            done = await engine.generate(name + "2", turns[name][i], max_tokens=8)
            assert done.text == alone[name][i]

    # Concurrently: the two generations interleave token by token at the engine lock.
    sessions("x3")
    sessions("y3")
    got: dict[str, list[str]] = {"x": [], "y": []}

    async def agent(name: str) -> None:
        for prompt in turns[name]:
            got[name].append((await engine.generate(name + "3", prompt, max_tokens=8)).text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent, "x")
        tg.start_soon(agent, "y")
    assert got == alone


# -- KV export / import / prefill ---------------------------------------------------------


async def test_woken_session_continues_like_one_that_never_slept(
    engine: LlamaEngine, sessions: Callable[[str], str], reference: Reference
) -> None:
    # Hold a slot first so the woken session lands in a different one than "ref" had.
    sessions("other")
    woken = sessions("woken")
    assert engine.slot_of(woken) != reference.slot
    assert await engine.import_kv(woken, reference.snapshot)
    info = engine.session_info(woken)
    assert info.n_tokens == len(reference.snapshot.tokens)
    assert info.kv_bytes == len(reference.snapshot.data or b"")
    done = await engine.generate(woken, FOLLOW_UP, max_tokens=16)
    assert done.text == reference.continuation
    assert done.input_tokens == engine.count_tokens(FOLLOW_UP)
    with pytest.raises(EngineError, match="not empty"):
        await engine.import_kv(woken, reference.snapshot)


async def test_long_history(engine: LlamaEngine, sessions: Callable[[str], str]) -> None:
    ref = sessions("ref")
    await engine.generate(ref, LONG, max_tokens=0)
    snapshot = await engine.export_kv(ref)
    assert len(snapshot.tokens) == engine.count_tokens(LONG) + 1 > 512
    expected = (await engine.generate(ref, FOLLOW_UP, max_tokens=16)).text

    # Re-prefilling the history decodes the same chunks as the original prompt did, so
    # the continuation is identical. (A history whose sampled tokens were decoded one
    # at a time re-prefills in one batch instead, and llama.cpp's batched kernels round
    # differently: the continuation is then close, not bit-identical.)
    replay = sessions("replay")
    before = engine.stats.prefill_tokens
    seconds = await engine.prefill(replay, snapshot.tokens)
    assert seconds > 0
    assert engine.stats.prefill_tokens - before == len(snapshot.tokens)
    rate = engine.stats.prefill_tokens_per_s
    assert rate is not None
    assert rate > 0
    assert engine.session_info(replay).n_tokens == len(snapshot.tokens)
    assert (await engine.generate(replay, FOLLOW_UP, max_tokens=16)).text == expected

    # Past the sliding window the import is complete too (same tokens, same state size;
    # the bytes differ only because they name the slot) and the continuation is the
    # same: nothing was pending, so the woken session decodes exactly what "ref" did.
    woken = sessions("woken")
    assert await engine.import_kv(woken, snapshot)
    again = await engine.export_kv(woken)
    assert again.tokens == snapshot.tokens
    assert len(again.data or b"") == len(snapshot.data or b"")
    done = await engine.generate(woken, FOLLOW_UP, max_tokens=16)
    assert done.output_tokens == 16
    assert done.input_tokens == engine.count_tokens(FOLLOW_UP)
    assert done.text == expected


async def test_export_includes_the_last_sampled_token(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    a = sessions("a")
    done = await engine.generate(a, PROMPT, max_tokens=4)
    snapshot = await engine.export_kv(a)
    assert len(snapshot.tokens) == engine.count_tokens(PROMPT) + 1 + 4
    # ...in its token list; the KV leaves it pending, to be decoded with the next prompt
    # in the same batch as in a session that never slept.
    assert snapshot.n_kv == len(snapshot.tokens) - 1
    assert engine.decode(snapshot.tokens).endswith(PROMPT + done.text)
    b = sessions("b")
    assert await engine.import_kv(b, snapshot)
    after_a = await engine.generate(a, FOLLOW_UP, max_tokens=6)
    after_b = await engine.generate(b, FOLLOW_UP, max_tokens=6)
    assert after_a.text == after_b.text


async def test_unusable_snapshots_are_refused_and_leave_the_session_usable(
    engine: LlamaEngine, sessions: Callable[[str], str], reference: Reference
) -> None:
    good = reference.snapshot
    data = good.data or b""
    header_flipped = bytes([data[0] ^ 0xFF]) + data[1:]  # the cell count of the first cache
    bad = {
        "other fingerprint": dataclasses.replace(good, fingerprint="llama:other:0"),
        "no data": dataclasses.replace(good, data=None),
        "empty data": dataclasses.replace(good, data=b""),
        "truncated": dataclasses.replace(good, data=data[: len(data) // 2]),
        "corrupt header": dataclasses.replace(good, data=header_flipped),
        "fewer tokens than the data": dataclasses.replace(good, tokens=good.tokens[:-1]),
        "more tokens than the data": dataclasses.replace(
            good, tokens=(*good.tokens, 100), n_kv=len(good.tokens) + 1
        ),
        "two tokens pending": dataclasses.replace(
            good, tokens=(*good.tokens, 100, 101), n_kv=len(good.tokens)
        ),
        "token outside the vocabulary": dataclasses.replace(
            good, tokens=(*good.tokens[:-1], 10**9)
        ),
    }
    s = sessions("s")
    rejected = engine.stats.imports_rejected
    for case, snapshot in bad.items():
        assert not await engine.import_kv(s, snapshot), case
        assert engine.stats.last_reject_reason, case
        assert engine.session_info(s).n_tokens == 0, case
    assert engine.stats.imports_rejected - rejected == len(bad)
    # The refusals left the sequence clean: the good snapshot still wakes it exactly.
    assert await engine.import_kv(s, good)
    assert (await engine.generate(s, FOLLOW_UP, max_tokens=16)).text == reference.continuation


async def test_flipped_payload_byte_is_not_detected_by_llama(
    engine: LlamaEngine, sessions: Callable[[str], str], reference: Reference
) -> None:
    # llama.cpp validates the state's structure but has no checksum over the K/V tensor
    # bytes: a flipped bit in the payload imports "successfully". The Redis snapshot
    # layer checksums its chunks for exactly this reason. The low bit of an f16 keeps
    # the value finite, so the session stays usable, merely slightly wrong.
    data = bytearray(reference.snapshot.data or b"")
    data[len(data) // 2] ^= 0x01
    s = sessions("s")
    flipped = dataclasses.replace(reference.snapshot, data=bytes(data))
    assert await engine.import_kv(s, flipped)
    done = await engine.generate(s, FOLLOW_UP, max_tokens=4)
    assert done.output_tokens == 4


async def test_empty_session_snapshot_round_trips(
    engine: LlamaEngine, sessions: Callable[[str], str]
) -> None:
    a, b = sessions("a"), sessions("b")
    snapshot = await engine.export_kv(a)
    assert snapshot.tokens == ()
    assert snapshot.fingerprint == engine.fingerprint()
    assert await engine.import_kv(b, snapshot)
    assert engine.session_info(b).n_tokens == 0
    assert (await engine.generate(b, PROMPT, max_tokens=3)).output_tokens == 3
