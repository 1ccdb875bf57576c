"""Who the ingress serves: the checks on a request's origin, made before any work.

The ingress is reachable by more than its operator. Without a token it is bound to
loopback, and a loopback port is still reachable from any web page the operator's
browser shows (cross-site posts) and, through DNS rebinding, readable by one: so only
``Host`` values naming the bound address or localhost are served, and a request whose
``Origin`` is another site, or whose ``Sec-Fetch-Site`` says cross-site or same-site,
is refused. Text that reaches events and terminals may hold no control characters.
These are functions of strings, shared with the CLI (which escapes what it prints).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["CONTROL_CHARS", "has_control", "is_loopback", "refusal"]

CONTROL_CHARS = re.compile(
    r"[\x00-\x1f\x7f-\x9f"  # C0, DEL, C1
    r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidi marks and overrides
    r"\u2028\u2029]"  # line and paragraph separators
)
"""Characters that move a terminal's cursor, colour or clear it (C0, DEL, C1), end a
line (line and paragraph separators too) or reorder what follows (bidi overrides): text
holding them can forge lines in a log or an event listing."""

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def has_control(text: str) -> bool:
    """Whether ``text`` holds a character of :data:`CONTROL_CHARS`."""
    return CONTROL_CHARS.search(text) is not None


def _host_port(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """``host[:port]`` (``[v6]:port`` too) as (lower-case host, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value.partition("]")
        host, port = host + "]", rest[1:] if rest.startswith(":") else None
        if not sep or (rest and not rest.startswith(":")):
            return None
    else:
        host, sep, port = value.partition(":")
        port = port if sep else None
    if not host:
        return None
    if port is None or port == "":
        return host, default_port
    return (host, int(port)) if port.isascii() and port.isdigit() else None


def _bracketed(host: str) -> str:
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def refusal(headers: Mapping[str, str], *, bind: tuple[str, int] | None, token: bool) -> str | None:
    """Why a request with these (lower-case named) ``headers`` must be refused, or None.

    Without a ``token`` (loopback) the ``Host`` must name the bound address or localhost
    (with ``bind``'s port; any port when ``bind`` is None); with one, any ``Host`` is
    served. Either way an ``Origin`` must be such a host (with a token: the ``Host``
    itself), and ``Sec-Fetch-Site`` must not be ``cross-site`` or ``same-site``.
    """
    names = {*_LOOPBACK_NAMES, *([_bracketed(bind[0])] if bind else [])}
    port = bind[1] if bind else None

    def local(value: str, default_port: int | None) -> bool:
        parsed = _host_port(value, default_port)
        if parsed is None or parsed[0] not in names:
            return False
        return port is None or parsed[1] == port

    host = headers.get("host", "")
    if not token and not local(host, 80):
        return f"Host {host!r} is not this server's address; use http://127.0.0.1:PORT"
    site = headers.get("sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"a {site} request from a web page is not accepted"
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin) if origin != "null" else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            return f"Origin {origin!r} is not accepted"
        default = 443 if parts.scheme == "https" else 80
        same = _host_port(parts.netloc, default) == _host_port(host, default)
        if not (local(parts.netloc, default) if not token else same):
            return f"Origin {origin!r} is not this server"
    return None
