"""The unit tier: it mirrors the package and starts no process and no server socket
(tests/e2e/ proves the real multi-process system). The fixture below holds every unit
test to that, so a test that needs a process fails here instead of slowing the tier."""
from __future__ import annotations

import multiprocessing.process
import socket
import subprocess
from typing import NoReturn

import grpc
import pytest
import zmq


def _refuse(what: str):  # type: ignore[no-untyped-def]
    def refuse(*_: object, **__: object) -> NoReturn:
        raise AssertionError(f"a unit test starts no {what} (tests/e2e/ is for that)")
    return refuse


@pytest.fixture(autouse=True)
def no_processes_no_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("process"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("process"))
    monkeypatch.setattr(socket.socket, "listen", _refuse("server socket"))
    monkeypatch.setattr(zmq.Socket, "bind", _refuse("server socket"))
    monkeypatch.setattr(grpc, "server", _refuse("gRPC server"))
    monkeypatch.setattr(grpc.aio, "server", _refuse("gRPC server"))
