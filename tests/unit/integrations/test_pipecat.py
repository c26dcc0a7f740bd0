"""pipeline.integrations.pipecat: what the service checks when it is built (its behaviour in a
pipeline against a server: tests/e2e/test_pipecat.py)."""
from __future__ import annotations

import pytest

from pipeline.integrations.pipecat import LipsyncVideoService


def test_a_service_url_that_is_not_a_websocket_is_refused_at_once() -> None:
    """LipsyncVideoService(url="http://…") raises ValueError when built, naming the URL."""
    with pytest.raises(ValueError, match="not a WebSocket URL: 'http://localhost:8080'"):
        LipsyncVideoService(url="http://localhost:8080")
    assert LipsyncVideoService(url="wss://avatar.example.com:8443/") is not None
