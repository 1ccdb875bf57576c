"""Tests for SimEngine's limits: the factory, turns between sessions (parallel), a busy
session, context overflow and the latency of export and import, which the runtime's
tests rely on being the llama engine's (see SimEngine.like_llama)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from agentos.engine import (
    BACKENDS,
    ContextOverflow,
    EngineError,
    SimEngine,
    create_engine,
)
from tests.sim_support import FOLLOW_UP, PROMPT, invoke, opened

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- factory ------------------------------------------------------------------------------


def test_create_engine_builds_sim_with_options() -> None:
    engine = create_engine("sim", seed=3, slots=4)
    assert isinstance(engine, SimEngine)
    assert engine.slots == 4
    assert engine.fingerprint() == SimEngine(seed=3).fingerprint()


def test_create_engine_unknown_name_lists_backends() -> None:
    with pytest.raises(EngineError, match="nope") as info:
        create_engine("nope")
    for backend in BACKENDS:
        assert backend in str(info.value)


@pytest.mark.parametrize("options", [{"bogus": 1}, {"slots": 0}])
def test_create_engine_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(EngineError, match="bad options"):
        create_engine("sim", **options)


# -- llama's constraints: parallel, overflow, export/import latency ------------------------


@pytest.mark.parametrize(
    ("options", "parallel"),
    [
        ({}, 64),
        ({"slots": 4}, 4),
        ({"parallel": 1}, 1),
        ({"slots": 4, "parallel": 2}, 2),
    ],
)
def test_parallel_reports_the_limit(options: dict[str, Any], parallel: int) -> None:
    assert SimEngine(**options).parallel == parallel


def test_like_llama_has_the_llama_engines_limits_and_takes_overrides() -> None:
    engine = SimEngine.like_llama()
    assert (engine.parallel, engine.overflow, engine.slots) == (1, "raise", 8)
    assert engine.n_ctx == 2048
    small = SimEngine.like_llama(n_ctx=64, slots=2, overflow="slide")
    assert (small.n_ctx, small.slots, small.overflow, small.parallel) == (64, 2, "slide", 1)


# A call that stays in the engine until cancelled: an export with a latency of an hour.
HOUR = 3600.0


@pytest.mark.parametrize(
    ("parallel", "second_runs_meanwhile"),
    [(None, True), (1, False), (2, True)],
)
async def test_calls_of_other_sessions_wait_for_a_turn(
    parallel: int | None, second_runs_meanwhile: bool
) -> None:
    engine = SimEngine(slots=4, parallel=parallel, export_latency_s=HOUR)
    engine.open_session("a")
    engine.open_session("b")
    b_done = anyio.Event()

    async def second() -> None:
        await engine.prefill("b", engine.encode("hello there"))
        b_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.export_kv, "a")
        await wait_all_tasks_blocked()
        tg.start_soon(second)
        await wait_all_tasks_blocked()
        assert b_done.is_set() is second_runs_meanwhile
        tg.cancel_scope.cancel()
    # A cancelled export gives its turn back.
    await engine.prefill("b", engine.encode("again"))


async def test_parallel_one_interleaves_streams_token_by_token() -> None:
    engine = SimEngine(slots=2, parallel=1, decode_s_per_token=0.001)
    engine.open_session("a")
    engine.open_session("b")
    order: list[str] = []

    async def run(name: str) -> None:
        async for chunk in engine.stream(name, PROMPT, max_tokens=6):
            order.extend([name] * len(chunk.token_ids))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a")
        tg.start_soon(run, "b")
    assert sorted(order) == ["a"] * 6 + ["b"] * 6
    assert order != sorted(order)  # neither call held the engine for its whole run
    # Taking turns changes nothing in what each session generates.
    alone = opened("a")
    await alone.generate("a", PROMPT, max_tokens=6)
    assert engine.context_tokens("a") == alone.context_tokens("a")


SECOND_CALLS: list[tuple[str, Callable[[SimEngine], Awaitable[object] | object]]] = [
    ("generate", lambda e: e.generate("s", "hi")),
    ("stream", lambda e: e.stream("s", "hi")),
    ("prefill", lambda e: e.prefill("s", e.encode("hi"))),
    ("export_kv", lambda e: e.export_kv("s")),
    ("reset_session", lambda e: e.reset_session("s")),
    ("chat", lambda e: e.chat("s", [{"role": "user", "content": "hi"}])),
]


@pytest.mark.parametrize("call", [c for _, c in SECOND_CALLS], ids=[n for n, _ in SECOND_CALLS])
async def test_a_second_call_on_a_busy_session_is_an_error(
    call: Callable[[SimEngine], Awaitable[object] | object],
) -> None:
    engine = opened(parallel=1, export_latency_s=HOUR)
    await engine.prefill("s", engine.encode(PROMPT))
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.export_kv, "s")
        await wait_all_tasks_blocked()
        with pytest.raises(EngineError, match="export_kv is in flight"):
            await invoke(engine, call)
        tg.cancel_scope.cancel()
    assert engine.session_info("s").n_tokens == engine.count_tokens(PROMPT)
    # Free again once the first call is gone.
    assert (await engine.generate("s", "hi", max_tokens=1)).output_tokens == 1


async def test_import_into_a_busy_session_is_an_error() -> None:
    engine = opened(parallel=1, import_latency_s=HOUR)
    snapshot = await engine.export_kv("s")
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.import_kv, "s", snapshot)
        await wait_all_tasks_blocked()
        with pytest.raises(EngineError, match="import_kv is in flight"):
            await engine.import_kv("s", snapshot)
        tg.cancel_scope.cancel()


async def test_an_open_stream_holds_its_session_until_closed() -> None:
    engine = opened(parallel=1)
    chunks = engine.stream("s", PROMPT, max_tokens=50)
    assert isinstance(chunks, AsyncGenerator)
    await anext(chunks)
    with pytest.raises(EngineError, match="stream is in flight"):
        await engine.generate("s", "more")
    await chunks.aclose()
    assert (await engine.generate("s", "more", max_tokens=3)).output_tokens == 3


async def test_without_parallel_a_busy_session_is_not_checked() -> None:
    engine = opened(export_latency_s=HOUR)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.export_kv, "s")
        await wait_all_tasks_blocked()
        await engine.generate("s", "hi", max_tokens=2)
        tg.cancel_scope.cancel()


async def test_closing_a_session_under_a_call_fails_the_call() -> None:
    engine = opened(parallel=1)
    chunks = engine.stream("s", PROMPT, max_tokens=50)
    assert isinstance(chunks, AsyncGenerator)
    await anext(chunks)
    engine.close_session("s")
    with pytest.raises(EngineError, match="was closed"):
        async for _ in chunks:
            pass


N_PROMPT = len(SimEngine().encode(PROMPT))  # 9 tokens

# (overflow, held tokens, call, max_tokens, outcome): outcome is an exception type or the
# session's token count afterwards. n_ctx is N_PROMPT + 4 throughout.
OVERFLOW_CASES: list[tuple[str, int, str, int, type[Exception] | int]] = [
    ("raise", 0, "generate", 4, N_PROMPT + 4),  # fits, fills the session, "length"
    ("raise", 0, "generate", 100, N_PROMPT + 4),
    ("raise", 4, "generate", 1, ContextOverflow),  # prompt fits, no room for a token
    ("raise", 4, "generate", 0, N_PROMPT + 4),  # prompt only: no room needed
    ("raise", 5, "generate", 0, ContextOverflow),
    ("raise", 5, "stream", 1, ContextOverflow),
    ("raise", 5, "prefill", 0, ContextOverflow),
    ("raise", 4, "prefill", 0, N_PROMPT + 4),
    ("slide", 5, "generate", 3, N_PROMPT + 4),  # the oldest tokens slide out instead
    ("slide", 5, "prefill", 0, N_PROMPT + 4),
]


@pytest.mark.parametrize(("overflow", "held", "call", "max_tokens", "outcome"), OVERFLOW_CASES)
async def test_overflow(
    overflow: str, held: int, call: str, max_tokens: int, outcome: type[Exception] | int
) -> None:
    engine = opened(n_ctx=N_PROMPT + 4, overflow=overflow)
    if held:
        await engine.prefill("s", engine.encode(" x" * held))
    before = engine.context_tokens("s")

    async def run() -> None:
        if call == "generate":
            done = await engine.generate("s", PROMPT, max_tokens=max_tokens)
            assert done.finish_reason == "length"
        elif call == "stream":
            engine.stream("s", PROMPT, max_tokens=max_tokens)  # raises before any anext
        else:
            await engine.prefill("s", engine.encode(PROMPT))

    if isinstance(outcome, int):
        await run()
        assert engine.session_info("s").n_tokens == outcome
    else:
        with pytest.raises(outcome, match=r"context overflow in session 's': \d+ tokens held"):
            await run()
        assert engine.context_tokens("s") == before  # unchanged, like llama
        assert issubclass(outcome, EngineError)


@pytest.mark.parametrize(
    ("option", "method"), [("export_latency_s", "export"), ("import_latency_s", "import")]
)
async def test_export_and_import_take_their_latency(option: str, method: str) -> None:
    latency = 0.05
    engine = opened(**{option: latency})
    await engine.generate("s", PROMPT, max_tokens=5)
    start = anyio.current_time()
    snapshot = await engine.export_kv("s")
    exported = anyio.current_time()
    engine.close_session("s")
    engine.open_session("s")
    assert await engine.import_kv("s", snapshot)
    imported = anyio.current_time()
    took = {"export": exported - start, "import": imported - exported}
    assert took[method] >= latency


async def test_like_llama_hibernates_losslessly() -> None:
    sleeper = SimEngine.like_llama(export_latency_s=0.0, import_latency_s=0.0)
    awake = SimEngine.like_llama()
    for engine in (sleeper, awake):
        engine.open_session("s")
        await engine.generate("s", PROMPT, max_tokens=20)
    snapshot = await sleeper.export_kv("s")
    sleeper.close_session("s")
    sleeper.open_session("s")
    assert await sleeper.import_kv("s", snapshot)
    after = await sleeper.generate("s", FOLLOW_UP, max_tokens=20)
    assert after.text == (await awake.generate("s", FOLLOW_UP, max_tokens=20)).text
