"""The `agentos.testing` pytest plugin, for real: fresh projects run by pytest's pytester.

Each test writes a project the way an agent author would (the README's Greeter agent,
its test, a conftest.py) into a temporary folder and runs pytest on it in a subprocess,
so that nothing of agentos's own test configuration leaks in.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import agentos

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[3] / "README.md"


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``, verbatim."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"README.md has no python block starting with {first_line!r}")


# What "Writing an agent" tells an author to write: the agent, the conftest, the test.
GREETER = readme_block("import msgspec\nimport agentos")
CONFTEST = readme_block("# conftest.py")
README_TEST = readme_block("# test_greeter.py")


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A fresh project folder with the Greeter agent, importing this checkout's agentos."""
    monkeypatch.setenv("PYTHONPATH", str(Path(agentos.__file__).resolve().parent.parent))
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    pytester.makepyfile(greeter=GREETER)
    return pytester


def run(project: pytest.Pytester, **files: str) -> pytest.RunResult:
    project.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})
    return project.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")


def test_the_readme_test_passes_with_the_one_line_conftest(project: pytest.Pytester) -> None:
    result = run(project, conftest=CONFTEST, test_greeter=README_TEST)
    result.assert_outcomes(passed=1)


def test_the_readme_shows_the_one_line() -> None:
    assert CONFTEST == '# conftest.py\npytest_plugins = ["agentos.testing"]\n'
    assert "from greeter import Greeter" in README_TEST


def test_without_the_plugin_pytest_refuses_the_async_test(project: pytest.Pytester) -> None:
    result = run(project, test_greeter=README_TEST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*async def functions are not natively supported*"])


@pytest.mark.parametrize(
    ("tests", "outcomes"),
    [
        # Plain tests are left alone, and an async test runs once, not once per backend.
        ("def test_sync():\n    assert True\n", {"passed": 1}),
        (
            "import pytest\n\n@pytest.mark.anyio\nasync def test_marked():\n    pass\n",
            {"passed": 1},
        ),
        # Async fixtures work for the tests the plugin claims.
        (
            """
            import pytest
            from agentos.testing import AgentHarness
            from greeter import Greeter

            @pytest.fixture
            async def harness():
                h = AgentHarness(Greeter)
                await h.message("warm up")
                yield h
                await h.stop()

            async def test_with_fixture(harness):
                await harness.message("again")
                assert harness.state.seen == 2
            """,
            {"passed": 1},
        ),
        # The backend is asyncio.
        (
            """
            import asyncio

            async def test_backend(anyio_backend):
                assert anyio_backend == "asyncio"
                asyncio.get_running_loop()  # raises on any other event loop
            """,
            {"passed": 1},
        ),
        # A test another async plugin claims is not taken over.
        (
            "import pytest\n\n@pytest.mark.asyncio\nasync def test_theirs():\n    pass\n",
            {"failed": 1},
        ),
    ],
    ids=["sync", "anyio-mark", "async-fixture", "asyncio-backend", "asyncio-mark"],
)
def test_what_the_plugin_claims(
    project: pytest.Pytester, tests: str, outcomes: dict[str, int]
) -> None:
    project.makeini("[pytest]\nmarkers =\n    asyncio: claimed by another plugin\n")
    result = run(project, conftest=CONFTEST, test_it=tests)
    result.assert_outcomes(**outcomes)
