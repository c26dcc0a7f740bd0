"""The end-to-end tier: the real multi-process server, started the way a user starts it."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.bench.local_server import ServerProcess
from tests.conftest import SMALL_FRAMES, write_config
from tests.helpers import FrameOracle

StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory,
                 small_models_root: Path) -> Iterator[StartServer]:
    """The one way these tests start `lipsync serve`: start_server(**config overrides)
    writes a config (the 32-frame demo avatar unless `models_root=` says otherwise), starts
    the server on free ports and waits until it serves; every server started is stopped
    (SIGTERM) when the module ends, if its test has not stopped it already."""
    started: list[ServerProcess] = []

    def start(models_root: Path | None = None, **overrides: object) -> ServerProcess:
        tmp = tmp_path_factory.mktemp("server")
        config = write_config(tmp / "config.yaml", models_root or small_models_root, **overrides)
        server = ServerProcess(config, log_path=tmp / "server.log")
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def oracle(small_models_root: Path) -> FrameOracle:
    """Which frame of the 32-frame demo avatar a JPEG shows."""
    return FrameOracle.of(small_models_root, SMALL_FRAMES)
