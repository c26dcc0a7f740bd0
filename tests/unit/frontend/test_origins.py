"""Browser Origin matching of the WebSocket handshake: exact scheme, host and port."""
from __future__ import annotations

import pytest

from pipeline.config import LOCAL_ORIGINS
from pipeline.frontend.streaming.websocket import origin_allowed

PATTERNS = ("http://localhost:*", "https://app.example.com", "https://*.example.org:8443")


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost:3000", True),
    ("http://localhost", False),                    # :* means an explicit port
    ("http://localhost:80@evil.com", False),        # user info: not an origin
    ("http://localhost.evil.com:80", False),
    ("http://localhost:3000/x", False),
    ("http://localhost:abc", False),
    ("https://app.example.com", True),
    ("https://APP.example.com", True),
    ("https://app.example.com:443", False),
    ("http://app.example.com", False),
    ("https://a.b.example.org:8443", True),
    ("https://example.org:8443", False),            # *. needs a subdomain
    ("https://evilexample.org:8443", False),
    ("https://*.example.org:8443", False),          # a pattern is not an origin
    ("null", False),
])
def test_origin_matching(origin: str, allowed: bool) -> None:
    """Each origin is allowed exactly when it matches a pattern label for label."""
    assert origin_allowed(origin, PATTERNS) is allowed


def test_local_defaults_include_the_ipv6_loopback() -> None:
    """The default allowlist takes http(s) on localhost, 127.0.0.1 and [::1], any port."""
    for origin in ("http://[::1]:8080", "https://127.0.0.1:3000", "http://localhost"):
        assert origin_allowed(origin, LOCAL_ORIGINS)
    assert not origin_allowed("http://[::2]:8080", LOCAL_ORIGINS)
