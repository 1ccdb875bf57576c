"""The pytest plugin behind ``pytest_plugins = ["agentos.testing"]``: agent tests are ``async def``.

An agent is coroutines, so its tests are too, and pytest runs none of them natively
("async def functions are not natively supported"). Rather than making every author
pick, install and configure an async plugin, one line in ``conftest.py`` hands every
``async def`` test of the project to anyio's pytest plugin (installed with anyio, an
agentos dependency) on the asyncio backend, which is what the daemon runs agents on.

It is opt-in and narrow, so nothing changes for projects that do not ask for it
(agentos's own suite included), nor for the tests of one that does which another async
plugin already claims:

* only coroutine test functions get anyio's mark, and only those without an ``anyio``,
  ``asyncio`` or ``trio`` mark of their own (or of their class or module);
* ``anyio_backend`` defaults to ``"asyncio"`` for the whole session; a project's own
  ``anyio_backend`` fixture overrides it.

Kept apart from :mod:`agentos.testing` so that importing ``AgentHarness`` never needs
pytest; :mod:`agentos.testing` re-exports these hooks when pytest is there.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["anyio_backend", "pytest_configure", "pytest_pycollect_makeitem"]

_CLAIMED_BY = ("anyio", "asyncio", "trio")


def _claimed(collector: pytest.Module | pytest.Class, obj: object) -> bool:
    own = getattr(obj, "pytestmark", ())
    return any(collector.get_closest_marker(name) for name in _CLAIMED_BY) or any(
        mark.name in _CLAIMED_BY for mark in own
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, None]:
    """Mark unclaimed ``async def`` tests for anyio, before anyio's own hook looks."""
    if collector.istestfunction(obj, name):
        inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
        if inspect.iscoroutinefunction(inner) and not _claimed(collector, obj):
            pytest.mark.anyio(obj)
    yield


def pytest_configure(config: pytest.Config) -> None:
    """Make sure anyio's plugin runs the marked tests, even with plugin autoload off."""
    import anyio.pytest_plugin

    manager = config.pluginmanager
    if not manager.has_plugin("anyio") and not manager.is_registered(anyio.pytest_plugin):
        manager.register(anyio.pytest_plugin, "anyio")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The event loop agent tests run on: asyncio, as in the daemon."""
    return "asyncio"
