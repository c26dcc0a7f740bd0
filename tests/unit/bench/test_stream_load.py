"""`lipsync bench --stream` (audio-driven sessions): its figures on synthetic timestamps."""
from __future__ import annotations

import math

import pytest

from pipeline.bench.stream_load import (
    SessionLog,
    aggregate,
    completing_chunk,
    frame_latencies_ms,
    frame_need,
    percentile,
    summarize,
    table,
)

CHUNK = 640  # 40 ms


def synthetic_log(seconds: float, server_delay_s: float, tail_delay_s: float) -> SessionLog:
    """A session whose server answers each frame `server_delay_s` after its last sample was
    sent, and the flush's frames `tail_delay_s` after the flush."""
    total = int(seconds * 16000)
    log = SessionLog(session=0, total_samples=total, chunk_samples=CHUNK)
    log.send_times = [100.0 + 0.04 * k for k in range(math.ceil(total / CHUNK))]
    log.flush_time = log.send_times[-1] + 0.001
    for i in range(log.expected_frames):
        need = frame_need(i)
        if need <= total:
            t = log.send_times[completing_chunk(need, CHUNK)] + server_delay_s
        else:
            t = log.flush_time + tail_delay_s
        log.arrivals.append((i, t))
    log.flushed = True
    return log


def test_percentile_and_chunk_arithmetic():
    """Percentiles interpolate linearly; a frame's completing chunk is the one holding its
    last needed sample."""
    assert percentile([], 99) == 0.0
    assert percentile([10.0, 20.0], 50) == pytest.approx(15.0)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert completing_chunk(640, 640) == 0        # samples [0, 640): chunk 0
    assert completing_chunk(641, 640) == 1
    assert completing_chunk(7200, 640) == 11      # frame 0 needs 450 ms: chunk 11 ends at 7680
    assert frame_need(0) == 7200


def test_latencies_from_chunk_and_flush_send_times():
    """Frame latency is measured from the completing chunk's send, or the flush's beyond the
    audio sent."""
    send = [0.0, 0.04, 0.08]
    # frame 0 needs 7200 samples: with 3200-sample chunks that is chunk 2 (sent at 0.08)
    assert frame_latencies_ms([(0, 0.1)], send, 3200, 9600, None) == [pytest.approx(20.0)]
    # with only 6400 samples sent, frame 0 lies beyond them: the flush (at 0.09) renders it
    assert frame_latencies_ms([(0, 0.1)], send[:2], 3200, 6400, 0.09) == [pytest.approx(10.0)]
    assert frame_latencies_ms([(0, 0.1)], send[:2], 3200, 6400, None) == []


def test_summary_of_a_server_that_keeps_up():
    """A 30 ms server on 3 s of audio: 75 frames, 30 ms latencies, 40 ms gaps, live fps 25,
    and the flush burst raising the delivered fps above 25."""
    s = summarize(synthetic_log(3.0, 0.030, 0.050))
    assert s["frames"] == s["expected_frames"] == 75
    assert s["latency_ms_p50"] == pytest.approx(30.0, abs=0.2)
    assert s["latency_ms_p99"] == pytest.approx(50.0, abs=0.2)    # the flush's frames
    assert s["live_latency_ms_p99"] == pytest.approx(30.0, abs=0.2)
    assert s["flush_latency_ms_max"] == pytest.approx(50.0, abs=0.2)
    assert s["live_fps"] == pytest.approx(25.0, abs=0.1)
    assert 25.0 < s["fps"] < 30.0
    assert s["p99_gap_ms"] == pytest.approx(40.0, abs=0.2)
    # frame 0 completes with chunk 11, sent 440 ms after chunk 0, plus 30 ms
    assert s["first_frame_latency_ms"] == pytest.approx(470.0, abs=0.2)
    assert s["holds_25fps"] is True


def test_summary_of_a_server_that_falls_behind_or_drops_frames():
    """Frames arriving at 20 fps, or a missing frame, do not hold 25 fps."""
    log = synthetic_log(20.0, 0.030, 0.050)
    log.arrivals = [(i, 100.5 + i / 20) for i, _ in log.arrivals]
    slow = summarize(log)
    assert slow["fps"] == pytest.approx(20.0, abs=0.01) and not slow["holds_25fps"]
    assert slow["latency_ms_max"] > 4000  # 5 s behind by the end
    short = synthetic_log(3.0, 0.030, 0.050)
    short.arrivals.pop()
    assert summarize(short)["holds_25fps"] is False
    result = aggregate([summarize(synthetic_log(3.0, 0.03, 0.05)), slow], 2, 20.0, 40.0)
    assert result["min_fps"] == slow["fps"]
    assert result["max_p99_latency_ms"] == slow["latency_ms_p99"]
    assert result["all_hold_25fps"] is False and result["errors"] == 0
    text = table(result)
    assert "every session holds 25 fps: NO" in text and f"{slow['fps']:.2f}" in text
