"""The frontend core's unit tests: the liveness module's clock, moved by hand."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.frontend import liveness as liveness_module
from tests.unit.frontend.fakes import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(liveness_module, "time", SimpleNamespace(monotonic=c.monotonic))
    return c
