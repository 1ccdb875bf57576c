"""Notices a blocked event loop and names the agent whose code blocked it.

Every agent of a daemon shares one event loop: agent code that blocks it (``time.sleep``,
``subprocess.run``, a sync HTTP client) stops all of them. Leases survive that (they are
renewed from a thread, :mod:`agentos.store.keeper`); this module makes the block visible
and charges it to its author, as Temporal's deadlock detector does for a workflow task
that does not yield. A loop task beats every ``beat_s``; a thread expects the beats. When
one is later than ``threshold_s``, the thread takes the loop thread's stack
(``sys._current_frames``), finds the agent whose code runs (the runner marks it while
agent code runs: a contextvar cannot be read from another thread, so the mark is a plain
dict keyed by thread) and the agent's own innermost frame, and logs it at once (a loop
that never comes back is still named). When the loop runs again, the beat hands the
:class:`Stall`, with the seconds it lasted, to the daemon, which writes the event through
the agent's runner (its fenced writer, its crash count) on the loop.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import anyio

__all__ = ["LoopWatchdog", "Mark", "Stall", "marked", "running"]

log = logging.getLogger("agentos.daemon")
_T = TypeVar("_T")


@dataclass(eq=False, slots=True)
class Mark:
    """Whose code runs: the agent's name and the module of its class. ``blocked`` is
    set by the watchdog's thread the moment it charges a block to this agent (before
    the loop runs again): the runner's task sees it whatever runs first afterwards."""

    agent: str
    module: str
    blocked: bool = False


# Loop thread id -> the agent whose code runs on it now (read by the watchdog thread).
_RUNNING: dict[int, Mark] = {}


@dataclass(frozen=True, slots=True)
class Stall:
    """One block of the event loop longer than the threshold."""

    agent: str | None  # the agent whose own code blocked; None: not agent code
    where: str  # "path/module.py:LINE" of the agent's frame (else the innermost frame)
    seconds: float  # how long the loop did not run (known once it runs again)


class _Marked:
    """Awaits a coroutine with ``mark`` set for every step it runs (see :func:`marked`)."""

    __slots__ = ("_coro", "_mark")

    def __init__(self, mark: Mark, coro: Coroutine[Any, Any, _T]) -> None:
        self._mark = mark
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        steps = self._coro.__await__()
        thread = threading.get_ident()
        value: Any = None
        error: BaseException | None = None
        while True:
            before = _RUNNING.get(thread)
            _RUNNING[thread] = self._mark
            try:
                yielded = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            finally:
                if before is None:
                    _RUNNING.pop(thread, None)
                else:
                    _RUNNING[thread] = before
            try:
                value, error = (yield yielded), None
            except GeneratorExit:
                self._coro.close()
                raise
            except BaseException as e:  # cancellation among them: thrown into the coroutine
                value, error = None, e


def marked(mark: Mark, coro: Coroutine[Any, Any, _T]) -> Awaitable[_T]:
    """``coro`` as an awaitable that marks ``mark.agent`` as running whenever it runs.

    The mark is set on each resumption, not around the whole await: while the coroutine
    waits, other agents' code runs on the same thread.
    """
    return _Marked(mark, coro)


@contextlib.contextmanager
def running(mark: Mark) -> Iterator[None]:
    """Mark ``mark.agent`` as running for synchronous agent code (``__init__``)."""
    thread = threading.get_ident()
    before = _RUNNING.get(thread)
    _RUNNING[thread] = mark
    try:
        yield
    finally:
        if before is None:
            _RUNNING.pop(thread, None)
        else:
            _RUNNING[thread] = before


def _where(frame: FrameType) -> str:
    """``path/module.py:LINE`` of ``frame`` (its module's dotted name as a path)."""
    filename = frame.f_code.co_filename
    module = frame.f_globals.get("__name__")
    if isinstance(module, str) and module != "__main__" and filename.endswith(".py"):
        tail = "/__init__.py" if filename.endswith("__init__.py") else ".py"
        filename = module.replace(".", "/") + tail
    return f"{filename}:{frame.f_lineno}"


def _owns(mark: Mark, module: object) -> bool:
    """Whether a frame of ``module`` is the marked agent's own code (its package's)."""
    if not isinstance(module, str):
        return False
    package = mark.module.partition(".")[0]
    if package == "agentos":  # an agent that lives in agentos: only its own module
        return module == mark.module
    return module == package or module.startswith(package + ".")


def locate(frame: FrameType | None, mark: Mark | None) -> Stall:
    """Who blocked the loop, from the loop thread's innermost ``frame``: the marked
    agent if one of its own frames is on the stack (the innermost of them gives the
    place), else nobody (agentos itself or code outside any agent), at the innermost
    frame. ``seconds`` is 0: the stall is still going on."""
    innermost = frame
    f = frame
    while f is not None:
        if mark is not None and _owns(mark, f.f_globals.get("__name__")):
            return Stall(mark.agent, _where(f), 0.0)
        f = f.f_back
    return Stall(None, _where(innermost) if innermost is not None else "?", 0.0)


class LoopWatchdog:
    """Measures the event loop's lag from a thread (see the module docstring).

    :meth:`run` is the loop's side (start it in the loop's task group); the thread
    starts with it and stops when it is cancelled.
    """

    def __init__(
        self,
        *,
        threshold_s: float = 1.0,
        beat_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold_s = threshold_s
        self.beat_s = beat_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()
        self._stall: Stall | None = None  # seen by the thread, still going on
        self._stall_since = 0.0
        self._loop_thread = 0
        self._stop = threading.Event()

    def beat(self) -> Stall | None:
        """The loop is running now: the stall that just ended, with its length, if any."""
        now = self._clock()
        with self._lock:
            self._last = now
            stall, self._stall = self._stall, None
            if stall is None:
                return None
            return Stall(stall.agent, stall.where, now - self._stall_since)

    def check(self) -> Stall | None:
        """The thread's look: a stall newly found (logged once), or None."""
        with self._lock:
            if self._stall is not None:
                return None
            last = self._last
            lag = self._clock() - last
            if lag < self.threshold_s:
                return None
            frame = sys._current_frames().get(self._loop_thread)
            mark = _RUNNING.get(self._loop_thread)
            stall = locate(frame, mark)
            if mark is not None and stall.agent is not None:
                mark.blocked = True
            self._stall, self._stall_since = stall, last
        who = f"agent {stall.agent}" if stall.agent else "code outside any agent"
        log.warning(
            "event loop blocked for %.1fs so far by %s at %s; every agent of this daemon "
            "waits (leases are kept)",
            lag,
            who,
            stall.where,
        )
        return stall

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s):
            self.check()

    async def run(self, on_stall: Callable[[Stall], None]) -> None:
        """Beat every ``beat_s`` and hand each stall that ended to ``on_stall``."""
        self._loop_thread = threading.get_ident()
        self._last = self._clock()
        self._stop.clear()
        thread = threading.Thread(target=self._watch, name="agentos-watchdog", daemon=True)
        thread.start()
        try:
            while True:
                stall = self.beat()
                if stall is not None:
                    on_stall(stall)
                await anyio.sleep(self.beat_s)
        finally:
            self._stop.set()
