"""The SDK's public surface is pinned: changing it must be a deliberate, visible act."""

from __future__ import annotations

import agentos


def test_all_is_pinned() -> None:
    assert sorted(agentos.__all__) == sorted(
        [
            "LLM",
            "Agent",
            "AgentResource",
            "Client",
            "ClientError",
            "Completion",
            "Context",
            "EngineError",
            "InboxFull",
            "Message",
            "MessageTooLarge",
            "NoFreeSlot",
            "NotFound",
            "Outcome",
            "Phase",
            "QuotaExceeded",
            "QuotaPolicyResource",
            "Reply",
            "RouteExhausted",
            "Settings",
            "SpecError",
            "StopReason",
            "TaskInfo",
            "TokenUsage",
            "Tool",
            "ToolCall",
            "ToolError",
            "Toolbox",
            "Usage",
            "WaitTimeout",
            "__version__",
            "load_paths",
            "parse_text",
            "tool",
        ]
    )


def test_every_public_name_exists() -> None:
    for name in agentos.__all__:
        assert getattr(agentos, name) is not None
