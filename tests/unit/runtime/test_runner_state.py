"""Tests for agentos.runtime.state: the runner's state is read through views and changed
only through the state itself (an assignment to a view would hide the state's field)."""

from __future__ import annotations

import pytest

from agentos.core.lifecycle import Phase
from agentos.runtime.runner import AgentRunner
from agentos.runtime.state import RunnerState, View


class _Holder:
    phase: View[Phase] = View("phase")
    hibernate_requested: View[str | None] = View("hibernate_requested")

    def __init__(self) -> None:
        self.state = RunnerState()


def test_a_view_reads_the_state_it_names() -> None:
    holder = _Holder()
    holder.state.hibernate_requested = "requested by operator"
    assert holder.hibernate_requested == "requested by operator"
    holder.state.hibernate_requested = None
    assert holder.hibernate_requested is None


def test_assigning_a_view_raises_instead_of_hiding_the_state() -> None:
    holder = _Holder()
    holder.state.hibernate_requested = "requested by operator"
    with pytest.raises(AttributeError, match=r"set runner\.state\.hibernate_requested"):
        holder.hibernate_requested = None  # type: ignore[misc]
    assert holder.state.hibernate_requested == "requested by operator"
    assert "hibernate_requested" not in vars(holder)


def test_the_runner_exposes_its_state_only_through_views() -> None:
    views = {name for name, v in vars(AgentRunner).items() if isinstance(v, View)}
    assert {"phase", "stop_reason", "hibernate_requested", "release_due", "released"} <= views
    for name in views:
        assert hasattr(RunnerState(), vars(AgentRunner)[name].name)
