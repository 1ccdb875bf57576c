"""TODO(#26 sweep): the model throttle moved to :mod:`agentos.store.models` (``store.models``).

Kept so that the old import path still works; nothing in agentos imports it any more.
"""

from __future__ import annotations

from agentos.store.models import Models

__all__ = ["Models"]
