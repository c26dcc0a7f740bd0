"""The integrations stay outside the server: no role, launcher or runtime module imports them
(only the `lipsync livekit-avatar` command does, when it runs)."""
from __future__ import annotations

from tests.unit.test_architecture import IMPORTS


def test_the_server_never_imports_the_integrations() -> None:
    """Nothing of pipeline/ outside pipeline.integrations imports it, but the livekit-avatar
    command (which imports it inside the command, with the extra's SDK)."""
    importers = sorted(m for m, imports in IMPORTS.items()
                       if not m.startswith("pipeline.integrations")
                       and any(i.startswith("pipeline.integrations") for i in imports))
    assert importers == ["pipeline.cli.livekit_avatar"]


def test_the_integrations_use_the_client_side_only() -> None:
    """pipeline.integrations imports no role of the server (frontend, gpu_worker, compositor)."""
    crossings = sorted((m, i) for m, imports in IMPORTS.items()
                       if m.startswith("pipeline.integrations") for i in imports
                       if i.split(".")[1] in ("frontend", "gpu_worker", "compositor"))
    assert crossings == []
