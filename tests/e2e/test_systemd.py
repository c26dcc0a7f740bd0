"""The systemd deployment: the unit files are valid and run `lipsync role`, the example
config loads, and a standalone role speaks sd_notify (READY=1, STATUS=, WATCHDOG=1)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from multiprocessing import Pipe
from pathlib import Path

import pytest

from pipeline.cli.main import build_parser
from pipeline.config import load_config
from pipeline.launch.standalone import EX_CONFIG, cmd_role
from pipeline.runtime.process import Readiness, sd_notify

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICES = ("lipsync-frontend.service", "lipsync-gpu-worker@.service",
            "lipsync-compositor@.service")
INSTALLED_BINARY = "/opt/lipsync/.venv/bin/lipsync"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def directives(path: Path) -> dict[str, list[str]]:
    """`Key` -> every value it is given (systemd allows a key several times)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify_problems(unit_dir: Path) -> list[str]:
    """What `systemd-analyze verify` says about our units (empty: clean).

    verify only warns, exit code 0, about an unknown or unparsable directive, so every line
    naming one of our units counts. It checks that ExecStart's binary is executable, so the
    copies point it at this checkout's `lipsync` instead of the installed path.
    """
    if not Path(SYSTEMD_ANALYZE).is_file():
        pytest.skip(f"systemd-analyze not found (looked for {SYSTEMD_ANALYZE}); "
                    "install systemd to verify the unit files")
    binary = Path(sys.executable).with_name("lipsync")
    assert binary.is_file(), f"{binary} missing: install the package (pip install -e .)"
    for unit in unit_dir.iterdir():
        unit.write_text(unit.read_text().replace(INSTALLED_BINARY, str(binary)))
    targets = [str(unit_dir / "lipsync.target"), str(unit_dir / "lipsync-frontend.service"),
               str(unit_dir / "lipsync-gpu-worker@0.service"),
               str(unit_dir / "lipsync-gpu-worker@1.service"),
               str(unit_dir / "lipsync-compositor@0.service")]
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *targets], capture_output=True, text=True,
        timeout=60, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0"})
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "lipsync" in line]
    if result.returncode != 0:
        problems.append(f"systemd-analyze verify exited {result.returncode}")
    return problems


def copy_units(tmp_path: Path) -> Path:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for unit in [*SERVICES, "lipsync.target"]:
        shutil.copy(UNITS / unit, unit_dir / unit)
    return unit_dir


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The target, the frontend and instances of both templates verify without a warning."""
    assert verify_problems(copy_units(tmp_path)) == []


@pytest.mark.parametrize("unit, good, bad", [
    ("lipsync-gpu-worker@.service", "RestartSec=2", "RestatSec=2"),
    ("lipsync-frontend.service", "KillMode=mixed", "KillMode=mixd"),
    ("lipsync.target", "Wants=", "Wnats="),
])
def test_verify_catches_a_broken_unit(tmp_path: Path, unit: str, good: str, bad: str) -> None:
    """A typo'd directive or value in a copy of a unit makes the check fail, naming it."""
    unit_dir = copy_units(tmp_path)
    text = (unit_dir / unit).read_text()
    broken = re.sub(f"^{re.escape(good)}", bad, text, count=1, flags=re.MULTILINE)
    assert broken != text
    (unit_dir / unit).write_text(broken)
    problems = verify_problems(unit_dir)
    assert problems and any(unit in p for p in problems), problems


@pytest.mark.parametrize("unit, role", [("lipsync-frontend.service", "frontend"),
                                        ("lipsync-gpu-worker@.service", "gpu-worker"),
                                        ("lipsync-compositor@.service", "compositor")])
def test_exec_start_is_a_lipsync_role_command(unit: str, role: str) -> None:
    """ExecStart runs the installed `lipsync role <role>` with the /etc config, and (for a
    template) the instance as --index: the real command line parser accepts it."""
    (exec_start,) = directives(UNITS / unit)["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", "3"))
    assert argv[0] == INSTALLED_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_role and args.role == role
    assert args.config == Path("/etc/lipsync/config.yaml")
    assert args.index == (None if role == "frontend" else 3)


@pytest.mark.parametrize("unit", SERVICES)
def test_services_notify_restart_and_share_runtime_dir_and_shm(unit: str) -> None:
    """Every service: Type=notify with a watchdog, restart on failure but not on a bad
    config, part of lipsync.target, one user, the shared /run/lipsync kept across units,
    and nothing that would make /dev/shm private."""
    d = directives(UNITS / unit)
    expected = {"Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"],
                "Restart": ["on-failure"], "RestartSec": ["2"],
                "RestartPreventExitStatus": [str(EX_CONFIG)], "PartOf": ["lipsync.target"],
                "User": ["lipsync"], "RuntimeDirectory": ["lipsync"],
                "RuntimeDirectoryPreserve": ["yes"], "KillSignal": ["SIGTERM"],
                "TimeoutStopSec": ["15"], "NoNewPrivileges": ["yes"],
                "ProtectSystem": ["strict"], "PrivateTmp": ["yes"], "ProtectHome": ["yes"],
                "ReadWritePaths": ["/dev/shm"], "WantedBy": ["lipsync.target"]}
    assert {k: d.get(k) for k in expected} == expected
    assert "LimitNOFILE" in d
    for private in ("PrivateIPC", "PrivateDevices", "DevicePolicy"):
        assert private not in d
    assert not any("CUDA_VISIBLE_DEVICES" in e for e in d.get("Environment", []))


def test_workers_stop_after_the_frontend() -> None:
    """gpu-workers and compositors are ordered before the frontend, so systemd stops the
    frontend first and its draining requests still find their workers."""
    for unit in ("lipsync-gpu-worker@.service", "lipsync-compositor@.service"):
        assert "lipsync-frontend.service" in directives(UNITS / unit)["Before"]


def test_example_config_loads_and_matches_the_units() -> None:
    """systemd/config.yaml validates; its runtime dir is the units' RuntimeDirectory."""
    cfg = load_config(UNITS / "config.yaml")
    (runtime_dir,) = directives(UNITS / "lipsync-frontend.service")["RuntimeDirectory"]
    assert cfg.runtime.dir == Path("/run") / runtime_dir
    assert cfg.models_root == Path("/var/lib/lipsync/models")
    assert cfg.gpus.provider == "cuda"


# ---- sd_notify -------------------------------------------------------------------------

def notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(5)
    return sock


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_tells_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             abstract: bool) -> None:
    """A standalone role's ready() sends READY=1, MAINPID and STATUS to $NOTIFY_SOCKET (a
    path, or an abstract name written with '@'); failed() sends the reason as STATUS."""
    address = f"@lipsync-test-{os.getpid()}-{abstract}" if abstract else str(tmp_path / "notify")
    with notify_socket(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        readiness = Readiness(None, "compositor 0")
        readiness.ready()
        assert fields(sock.recv(4096)) == {"READY": "1", "MAINPID": str(os.getpid()),
                                           "STATUS": "compositor 0 serving"}
        readiness.failed("compositor 0: OSError: boom")
        assert fields(sock.recv(4096)) == {"STATUS": "failed: compositor 0: OSError: boom"}
        readiness.stopping()
        assert fields(sock.recv(4096))["STOPPING"] == "1"


def test_under_a_supervisor_only_the_pipe_is_told(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With a pipe (`lipsync serve`) ready() reports through it and sends nothing to
    systemd, even when NOTIFY_SOCKET is inherited (only the unit's main pid may notify)."""
    with notify_socket(str(tmp_path / "notify")) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        parent, child = Pipe(duplex=False)
        Readiness(child, "frontend").ready()
        assert parent.recv() == ("ready", os.getpid())
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run by hand (no systemd), ready() is a no-op and sd_notify says it sent nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    Readiness(None).ready()
    assert sd_notify("READY=1") is False


WATCHDOG_CHILD = textwrap.dedent("""
    import os, sys, time
    from pipeline.runtime.process import Readiness
    if sys.argv[1] == "other":
        os.environ["WATCHDOG_PID"] = "1"   # the watchdog is meant for another process
    elif sys.argv[1] == "self":
        os.environ["WATCHDOG_PID"] = str(os.getpid())
    Readiness(None, "gpu_worker 0")
    time.sleep(1.0)
""")


@pytest.mark.parametrize("watchdog_pid", ["unset", "self"])
def test_watchdog_pings_every_half_interval(tmp_path: Path, watchdog_pid: str) -> None:
    """With WATCHDOG_USEC, WATCHDOG=1 comes every WATCHDOG_USEC/2 from start-up on, before
    ready(), for as long as the process lives."""
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        env.pop("WATCHDOG_PID", None)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", WATCHDOG_CHILD, watchdog_pid], env=env,
                       check=True, timeout=60)
        elapsed = time.monotonic() - t0
        sock.settimeout(0.1)
        pings = []
        try:
            while True:
                pings.append(fields(sock.recv(4096)))
        except TimeoutError:
            pass
    assert pings and all(p == {"WATCHDOG": "1"} for p in pings)
    # 1 s of life at one ping per 0.1 s (and never more than the whole run allows)
    assert 8 <= len(pings) <= elapsed / 0.1 + 1


def test_no_watchdog_pings_for_another_pid(tmp_path: Path) -> None:
    """WATCHDOG_PID naming another process (a child that inherited the env) means no pings."""
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        subprocess.run([sys.executable, "-c", WATCHDOG_CHILD, "other"], env=env, check=True,
                       timeout=60)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(4096)


# ---- a standalone role's prologue --------------------------------------------------------

STANDALONE_CHILD = textwrap.dedent("""
    import os, sys
    from pipeline.runtime import process
    os.getppid = lambda: 1     # what a systemd service sees: its parent is pid 1
    def body(readiness, stop):
        print("serving", flush=True)
        stop.wait(30)
        print("stopped", flush=True)
    process.run_role("compositor 0", None, body)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_standalone_role_runs_under_pid1_and_stops_on_signal(sig: signal.Signals) -> None:
    """A role without a parent pipe whose parent is pid 1 (systemd) runs instead of taking
    itself for orphaned, and SIGTERM or SIGINT (Ctrl-C by hand) stop it with exit 0."""
    proc = subprocess.Popen([sys.executable, "-c", STANDALONE_CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "serving\n", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert proc.stdout.read() == "stopped\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv, message", [
    (["gpu-worker"], "gpu-worker needs --index (0 .. 0, gpus.count is 1)"),
    (["compositor", "--index", "2"],
     "compositor --index 2 is outside 0 .. 1 (compositor.pool_size is 2)"),
    (["frontend", "--index", "1"], "frontend takes no --index"),
])
def test_role_refuses_an_index_the_config_does_not_have(tmp_path: Path, argv: list[str],
                                                        message: str) -> None:
    """An instance number outside the config exits EX_CONFIG (not restarted) and says why."""
    from tests.conftest import write_config

    config = write_config(tmp_path / "config.yaml", tmp_path / "models")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "role", *argv,
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == EX_CONFIG
    assert message in result.stderr


def test_role_with_a_bad_config_exits_ex_config(tmp_path: Path) -> None:
    """A bad config exits EX_CONFIG, the status the units do not restart on."""
    from tests.conftest import write_config

    config = write_config(tmp_path / "config.yaml", tmp_path / "models",
                          **{"output.jpeg_quality": 101})
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "role", "frontend",
                             "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == EX_CONFIG
    assert "output.jpeg_quality: must be 0-100" in result.stderr
