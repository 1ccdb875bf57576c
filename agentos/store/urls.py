"""Redis URLs made safe to print, so no error, log line or table ever shows a password.

redis-py reads credentials from two places in a URL: the userinfo
(``redis://user:secret@host``) and the query string, where *every* parameter becomes a
connection keyword (``redis://host/0?password=secret``, and for ``rediss://`` the
private key's ``ssl_password=``). :func:`redact_url` hides both, plus any other query
parameter whose name looks like a secret (``token``, ``api_key``...), and keeps the
rest exactly as written so the operator still sees which server and options were meant.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

__all__ = ["REDACTED", "is_secret_param", "redact_url"]

REDACTED = "***"

# The query parameters redis-py's parse_url turns into credentials (Connection's
# ``password``, SSLConnection's ``ssl_password``); ``username`` names, it does not prove.
_SECRET_PARAMS = frozenset({"password", "ssl_password"})
_SECRET_LOOKING = re.compile(r"pass|pwd|secret|token|credential|auth|api_?key|private", re.I)


def is_secret_param(name: str) -> bool:
    """Whether a URL query parameter called ``name`` carries (or looks like) a secret."""
    return name.lower() in _SECRET_PARAMS or _SECRET_LOOKING.search(name) is not None


def _redact_query(query: str) -> str:
    pieces = []
    for piece in query.split("&"):
        raw_name, sep, _ = piece.partition("=")
        if is_secret_param(unquote_plus(raw_name).strip()):
            piece = f"{raw_name}={REDACTED}" if sep else piece
        pieces.append(piece)
    return "&".join(pieces)


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``, safe to print and log.

    The userinfo password is replaced and the user kept (``redis://user:***@host``);
    ``password=``, ``ssl_password=`` and secret-looking query parameters get ``***`` as
    their value; a fragment is dropped. A URL that cannot be parsed is not shown at all.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else netloc
    query = _redact_query(parts.query) if parts.query else ""
    if not parts.scheme or "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    # By hand: urlunsplit turns unix:///path (an empty host) into unix:/path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
