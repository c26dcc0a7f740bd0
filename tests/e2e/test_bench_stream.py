"""`lipsync bench --stream` against a real server: audio-driven sessions, and a live sweep
with interrupts written as a table and a plot."""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET

from pipeline.bench.local_server import ServerProcess
from pipeline.bench.stream_load import FRAME_SAMPLES, frame_need
from pipeline.bench.streams import run_stream_bench
from tests.conftest import write_config


def bench_args(config, server: ServerProcess, **overrides: object) -> argparse.Namespace:
    """What `lipsync bench --stream` parses (the CLI's own parser: its defaults), with
    `overrides`."""
    from pipeline.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--stream", "--config", str(config), "--address",
                                      f"127.0.0.1:{server.ws_port}", "--seconds", "3", "--json"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_one_real_session_of_3_s(tmp_path, small_models_root, capsys):
    """One 3 s real-time session against a real server: 75 frames near 25 fps, positive
    latencies, no errors; a session the server refuses exits 1."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    with ServerProcess(config, log_path=tmp_path / "server.log") as server:
        args = bench_args(config, server)
        code = run_stream_bench(args)
        result = json.loads(capsys.readouterr().out)
        # a refused session is an error: exit code 1, the server's answer recorded
        refused = argparse.Namespace(**{**vars(args), "model": "nosuch", "seconds": 1.0})
        refused_code = run_stream_bench(refused)
        refused_result = json.loads(capsys.readouterr().out)
    assert refused_code == 1 and refused_result["errors"] == 1
    assert "404" in refused_result["per_session"][0]["errors"][0]
    assert refused_result["all_hold_25fps"] is False
    assert code == 0, result
    (s,) = result["per_session"]
    assert s["errors"] == [] and result["errors"] == 0
    assert s["frames"] == s["expected_frames"] == 75
    assert 20.0 <= s["fps"] <= 30.0
    assert 0 < s["latency_ms_min"] <= s["latency_ms_p50"]
    assert s["latency_ms_p50"] <= s["latency_ms_p99"] <= s["latency_ms_max"]
    # frame 0 cannot come before its 450 ms of audio was sent
    assert s["first_frame_latency_ms"] >= 1000 * frame_need(0) / 16000 - 40
    assert s["p99_gap_ms"] > 0
    # the figures every bench mode prints: frames/s and latency over all sessions, and
    # the server's own stage times over the run (from its ops socket)
    assert 20.0 <= result["fps"] <= 30.0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["stage_ms"]["unet"] > 0 and result["stage_ms"]["jpeg"] > 0
    assert result["min_fps"] == s["fps"] and result["sessions"] == 1
    assert FRAME_SAMPLES == 640


def test_a_live_sweep_with_interrupts(tmp_path, small_models_root, capsys):
    """`--stream --live --sweep 1,2 --interrupts 2` against a real server: each run's
    sessions get 25 frames/s of idle and speech frames, the interrupts are answered, and the
    sweep names the largest count holding 25 fps and writes its plot."""
    # admission is not the point here (other tests load the box meanwhile)
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"streaming.capacity_fps": 10_000})
    plot = tmp_path / "sweep.svg"
    with ServerProcess(config, log_path=tmp_path / "server.log") as server:
        code = run_stream_bench(bench_args(config, server, live=True, seconds=2.0, interrupts=2,
                                           sweep="1,2", plot=str(plot)))
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["mode"] == "live" and [r["sessions"] for r in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert run["errors"] == 0 and run["refused"] == 0
        assert run["idle_frames"] > 0 and run["speech_frames"] > 0
        assert run["interrupts"] == 2 and 0 < run["interrupt_ack_ms_p50"] < 1000
        assert run["first_speech_ms_p50"] > 1000 * frame_need(0) / 16000 - 40
        assert all(20.0 <= s["fps"] <= 30.0 for s in run["per_session"])
    assert summary["largest_holding_25fps"] in (0, 1, 2)
    svg = ET.parse(plot).getroot()
    assert svg.tag.endswith("svg")
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}polyline"))) == 3


def test_a_live_session_turned_away_at_the_handshake_is_refused_not_an_error(
        tmp_path, small_models_root, capsys):
    """A server full for this address answers the upgrade with HTTP 503: the live bench counts
    that session as refused, with the server's reason, as it does a capacity close."""
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"streaming.max_sessions_per_address": 1,
                             "streaming.capacity_fps": 10_000})
    with ServerProcess(config, log_path=tmp_path / "server.log") as server:
        code = run_stream_bench(bench_args(config, server, live=True, sessions=2, seconds=1.5))
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    assert result["refused"] == 1 and result["errors"] == 0, result
    (turned_away,) = [s for s in result["per_session"] if s["refused"]]
    assert turned_away["refused"].startswith("HTTP 503") and "per_address" in turned_away["refused"]
