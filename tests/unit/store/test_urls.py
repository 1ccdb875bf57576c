"""Tests for agentos.store.urls: no credential redis-py accepts in a URL is ever shown."""

from __future__ import annotations

import pytest

from agentos.store import redact_url as reexported
from agentos.store.urls import is_secret_param, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Nothing secret: unchanged.
        ("redis://host:6379", "redis://host:6379"),
        (
            "redis://127.0.0.1:6379/0?db=2&socket_timeout=5",
            "redis://127.0.0.1:6379/0?db=2&socket_timeout=5",
        ),
        ("unix:///tmp/v.sock", "unix:///tmp/v.sock"),
        ("unix:///tmp/v.sock?db=1", "unix:///tmp/v.sock?db=1"),
        ("redis://user@host/0", "redis://user@host/0"),  # a user alone is not a secret
        ("redis://host/0?username=alice", "redis://host/0?username=alice"),
        (
            "rediss://host/0?ssl_keyfile=/k.pem&ssl_ca_certs=/ca.pem",
            "rediss://host/0?ssl_keyfile=/k.pem&ssl_ca_certs=/ca.pem",
        ),
        # The userinfo password; the user is kept.
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
        ("redis://user:p@ss:w0rd@host/0", "redis://user:***@host/0"),  # '@' and ':' inside
        ("redis://user:pw@[::1]:6379/0", "redis://user:***@[::1]:6379/0"),
        ("redis://user:pw@host:notaport/0", "redis://user:***@host:notaport/0"),
        ("unix://user:pw@/tmp/v.sock", "unix://user:***@/tmp/v.sock"),
        # Every query parameter redis-py turns into a credential.
        ("redis://127.0.0.1:1/0?password=hunter2", "redis://127.0.0.1:1/0?password=***"),
        ("redis://h/0?username=alice&password=hunter2", "redis://h/0?username=alice&password=***"),
        (
            "rediss://h/0?ssl_keyfile=/k.pem&ssl_password=hunter2",
            "rediss://h/0?ssl_keyfile=/k.pem&ssl_password=***",
        ),
        ("redis://h/0?PASSWORD=hunter2", "redis://h/0?PASSWORD=***"),
        ("redis://h/0?pass%77ord=hunter2", "redis://h/0?pass%77ord=***"),  # percent-encoded name
        ("redis://h/0?password=a&password=b", "redis://h/0?password=***&password=***"),
        ("redis://u:pw@h/0?password=hunter2&db=3", "redis://u:***@h/0?password=***&db=3"),
        ("unix:///tmp/v.sock?password=hunter2", "unix:///tmp/v.sock?password=***"),
        ("redis://h/0?password", "redis://h/0?password"),  # no value to hide
        # Anything else that looks like a secret.
        (
            "redis://h/0?token=t0k&auth=a&api_key=k&client_secret=s",
            "redis://h/0?token=***&auth=***&api_key=***&client_secret=***",
        ),
        ("redis://h/0?client_name=svc&pwd=x", "redis://h/0?client_name=svc&pwd=***"),
        # A fragment is never needed to reach a server.
        ("redis://h/0#hunter2", "redis://h/0"),
        ("redis://[::1", "<unparseable url>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("ssl_password", True),
        ("Password", True),
        ("token", True),
        ("access_token", True),
        ("authorization", True),
        ("credential", True),
        ("apikey", True),
        ("private_key", True),
        ("username", False),
        ("db", False),
        ("ssl_keyfile", False),  # a path, not the key
        ("ssl_certfile", False),
        ("client_name", False),
        ("socket_timeout", False),
    ],
)
def test_is_secret_param(name: str, secret: bool) -> None:
    assert is_secret_param(name) is secret


def test_agentos_store_reexports_it() -> None:
    assert reexported is redact_url
