"""`lipsync lb-config`: the --box checks, the HAProxy config it prints (checked by
haproxy -c where HAProxy is installed) and the hand-written deploy/haproxy.cfg."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench.local_cluster import find_haproxy
from pipeline.cli.lb_config import (
    Box,
    SpecError,
    haproxy_config,
    parse_box,
    parse_boxes,
    parse_listen,
)

REPO = Path(__file__).resolve().parents[2]
THREE_BOXES = ["10.0.0.11:50053:8080:9464", "10.0.0.12:50053:8080:9464",
               "10.0.0.13:50053:8080:9464"]


def lb_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "lb-config", *args],
                          check=False, capture_output=True, text=True, timeout=60)


def haproxy_check(path: Path) -> None:
    haproxy = find_haproxy()
    if haproxy is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    check = subprocess.run([haproxy, "-c", "-f", str(path)], check=False, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def directives(text: str) -> list[str]:
    """The config's lines without comments and blank lines, whitespace squeezed."""
    lines = (re.sub(r"\s+", " ", line.split("#", 1)[0]).strip() for line in text.splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize("spec, message", [
    ("10.0.0.1:50053:8080", "expected HOST:GRPC_PORT:WS_PORT:METRICS_PORT"),
    ("10.0.0.1:50053:8080:9464:1", "expected HOST:GRPC_PORT:WS_PORT:METRICS_PORT"),
    (":50053:8080:9464", "the host is empty"),
    ("box:50053:8080:99999", "METRICS_PORT must be a port number 1-65535, got '99999'"),
    ("box:grpc:8080:9464", "GRPC_PORT must be a port number"),
    ("box:50053:50053:9464", "ports must differ"),
    ("[::1:50053:8080:9464", "needs its closing ']'"),
    ("[box]:50053:8080:9464", "is not an IPv6 address"),
    ("box#1:50053:8080:9464", "'box#1' is not a host name or address"),
    ("box\n    stats enable:50053:8080:9464", "is not a host name or address"),
    ("bad host:50053:8080:9464", "is not a host name or address"),
    ("box:５００５３:8080:9464", "GRPC_PORT must be a port number"),
    ("box:²:8080:9464", "GRPC_PORT must be a port number"),
])
def test_a_bad_box_spec_is_refused_saying_why(spec: str, message: str) -> None:
    """Each malformed --box names itself and what is wrong with it."""
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        parse_box(spec)
    assert repr(spec) in str(err.value)


def test_good_specs_parse_and_a_port_named_twice_is_refused() -> None:
    """Hostnames and bracketed IPv6 parse; one host:port in two --box is refused."""
    assert parse_box("gpu-1.lan:50053:8080:9464") == Box("gpu-1.lan", 50053, 8080, 9464)
    assert parse_box("[fd00::3]:1:2:3") == Box("[fd00::3]", 1, 2, 3)
    with pytest.raises(SpecError, match=r"10\.0\.0\.1:9464 is named twice"):
        parse_boxes(["10.0.0.1:50053:8080:9464", "10.0.0.1:50054:8081:9464"])


def test_the_command_exits_2_with_the_reason() -> None:
    """`lipsync lb-config` without a box, or with a bad one, prints why and exits 2."""
    none = lb_config("--listen-grpc", "50053", "--listen-ws", "8080")
    assert none.returncode == 2 and "at least one --box is needed" in none.stderr
    bad = lb_config("--listen-grpc", "50053", "--listen-ws", "8080", "--box", "a:1:2")
    assert bad.returncode == 2 and "'a:1:2': expected HOST:GRPC_PORT" in bad.stderr
    assert bad.stdout == ""


def test_the_config_hashes_the_model_and_falls_back_to_least_connections() -> None:
    """h2c gRPC and WebSocket frontends, each split into a consistent-hash backend (on
    x-model-id / ?model=) and a leastconn one; one /readyz check per box, tracked."""
    boxes = parse_boxes(THREE_BOXES)
    lines = directives(haproxy_config(boxes, ("*", 50053), ("*", 8080), ("127.0.0.1", 8404)))
    for expected in (
            "bind :50053 proto h2",
            "use_backend grpc_by_model if { req.hdr(x-model-id) -m found }",
            "default_backend grpc_least_conn",
            "balance hdr(x-model-id)", "hash-type consistent", "balance leastconn",
            "option httpchk GET /readyz", "http-check expect status 200",
            "use_backend ws_by_model if { url_param(model) -m found }",
            "balance url_param model", "timeout tunnel 1h", "timeout server 75s",
            "option redispatch 1", "bind 127.0.0.1:8404", "stats enable",
            "tune.bufsize 65536", "tune.h2.initial-window-size 8388608"):
        assert expected in lines, expected
    servers = [line for line in lines if line.startswith("server ")]
    assert len(servers) == 12
    checked = [s for s in servers if " check port 9464 check-proto h1 inter 500ms" in s]
    assert [s.split()[1:3] for s in checked] == [
        ["box1", "10.0.0.11:50053"], ["box2", "10.0.0.12:50053"], ["box3", "10.0.0.13:50053"]]
    assert all(f" id {s.split()[1][3:]} " in s for s in servers)  # same ids everywhere
    assert sum("track grpc_by_model/" in s for s in servers) == 9


@pytest.mark.parametrize("spec", [
    "8080\n    stats enable", "127.0.0.1:8080\n    option httpclose", "host\nx:8080",
    "ho#st:8080", "*#:8080", "８０８０", "8080 ", " 8080", "[::1]:80\n", ":8080",
])
def test_a_bad_listen_address_is_refused(spec: str) -> None:
    """--listen-grpc, --listen-ws and --stats-port take [HOST:]PORT only: a newline, a `#`,
    spaces or other digits never reach the config."""
    with pytest.raises(SpecError):
        parse_listen(spec, "*", "--listen-ws")


def test_an_injected_directive_never_reaches_the_output() -> None:
    """The command refuses a newline in --listen-ws / --stats-port, a `#` in a box host and
    a timeout that is not a number of seconds, printing nothing to stdout, exit 2, one line
    on stderr."""
    for args in (["--listen-ws", "8080\n    stats enable"],
                 ["--listen-ws", "8080", "--stats-port", "8404\n    stats auth a:b"],
                 ["--listen-ws", "8080", "--box", "10.0.0.1#:1:2:3"],
                 ["--listen-ws", "8080", "--request-timeout-s", "nan"],
                 ["--listen-ws", "8080", "--request-timeout-s", "inf"]):
        out = lb_config("--listen-grpc", "50053", *args, "--box", THREE_BOXES[0])
        assert out.returncode == 2 and out.stdout == "", out.stdout
        assert out.stderr.count("\n") == 1, out.stderr


def test_listen_addresses_that_are_good_parse() -> None:
    """PORT, HOST:PORT, *:PORT, [v6]:PORT and host names parse."""
    assert parse_listen("8080", "*", "--listen-ws") == ("*", 8080)
    assert parse_listen("*:8080", "127.0.0.1", "--listen-ws") == ("*", 8080)
    assert parse_listen("[::]:8080", "*", "--listen-ws") == ("[::]", 8080)
    assert parse_listen("lb-1.example.org:443", "*", "--listen-ws") == ("lb-1.example.org", 443)


def test_haproxy_accepts_the_generated_config(tmp_path: Path) -> None:
    """What `lipsync lb-config` prints passes `haproxy -c`, IPv6 box included."""
    out = lb_config("--listen-grpc", "127.0.0.1:50053", "--listen-ws", "8080",
                    "--stats-port", "0", "--box", THREE_BOXES[0], "--box", "[::1]:1:2:3")
    assert out.returncode == 0, out.stderr
    assert "frontend stats" not in out.stdout
    path = tmp_path / "haproxy.cfg"
    path.write_text(out.stdout)
    haproxy_check(path)


def test_the_deploy_example_is_what_lb_config_writes() -> None:
    """deploy/haproxy.cfg is valid and, comments aside, the command's three-box output."""
    example = REPO / "deploy" / "haproxy.cfg"
    out = lb_config("--listen-grpc", "50053", "--listen-ws", "8080",
                    *[arg for box in THREE_BOXES for arg in ("--box", box)])
    assert out.returncode == 0, out.stderr
    assert directives(example.read_text()) == directives(out.stdout)
    haproxy_check(example)
