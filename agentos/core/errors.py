"""The errors a request to the fleet ends with, shared by the client and agents' own sends.

``agentos send`` (the client) and ``ctx.send`` (an agent, through its runner) refuse the
same things in the same words: an agent that does not exist, a message larger than its
inbox takes. The classes live here, below both, so each raises the one type callers
catch (``agentos.NotFound``). Pure: exception classes only.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "ClientError", "MessageTooLarge", "NotFound"]

DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_576
"""The most bytes a message may have when its agent's inbox says nothing else."""


class ClientError(Exception):
    """A request the fleet cannot carry out, explained in words (exit code 1)."""


class NotFound(ClientError):
    """The named agent or policy does not exist."""


class MessageTooLarge(ClientError):
    """A message larger than the agent's inbox accepts (``maxMessageBytes``); nothing
    was enqueued."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        self.name, self.size, self.limit = name, size, limit
        super().__init__(f'message is {size} bytes; agent "{name}" accepts at most {limit}')
