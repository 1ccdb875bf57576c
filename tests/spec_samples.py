"""Spec texts and a helper shared by the spec tests (tests/unit/core/test_spec*.py)."""

import pytest

from agentos.core.spec import SpecError, SpecIssue, parse_text

AGENT_HEAD = """\
apiVersion: agentos/v1
kind: Agent
metadata: {name: a}
spec:
  entrypoint: pkg.mod:Agent
"""

POLICY_HEAD = """\
apiVersion: agentos/v1
kind: QuotaPolicy
metadata: {name: p}
spec:
  classes:
    standard: {tokensPerMinute: 100}
    batch: {tokensPerMinute: 10, maxConcurrent: 1}
"""


def issues_of(text: str, source: str = "x.yaml") -> list[SpecIssue]:
    """The issues parsing ``text`` reports (it must fail)."""
    with pytest.raises(SpecError) as caught:
        parse_text(text, source)
    return caught.value.issues
