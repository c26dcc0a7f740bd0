"""`lipsync bench --stream --live`: the plan of a run and its figures on synthetic logs, and
a sweep's table and plot."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipeline.bench.live_figures import (
    Frame,
    Interrupt,
    LiveLog,
    aggregate,
    first_speech_ms,
    interrupt_ms,
    jitter_ms,
    summarize,
    table,
)
from pipeline.bench.live_load import continuous_pcm, utterance_plan
from pipeline.bench.plot import sweep_svg
from pipeline.bench.streams import largest_holding, sweep_sizes, sweep_table

EPOCH = 1_700_000_000.0  # the wall clock minus the monotonic clock of the synthetic client


def steady_log(seconds: float, late_s: float = 0.01, speech: range = range(0)) -> LiveLog:
    """25 frames/s from monotonic 100.0, each `late_s` after its due time; frames in
    `speech` are speech frames."""
    log = LiveLog(session=0, epoch_offset=EPOCH)
    for i in range(int(seconds * 25)):
        due = 100.0 + i * 0.04
        log.frames.append(Frame(due + late_s, i, i in speech, round((due + EPOCH) * 1e6)))
    return log


def test_utterances_are_staggered_so_the_given_share_speaks_at_any_time() -> None:
    """Four sessions speaking half the time: at every instant two of them speak; idle-only
    and always-speaking plans are what they say."""
    plans = [utterance_plan(i, 4, 0.5, 12.0) for i in range(4)]
    for t in (0.5, 1.5, 3.9, 6.2, 10.0):
        speaking = sum(any(s <= t < s + d for s, d in plan) for plan in plans)
        assert speaking == 2, (t, plans)
    assert all(d <= 2.0 and s + d <= 12.0 for plan in plans for s, d in plan)
    assert utterance_plan(3, 4, 0.0, 12.0) == []
    assert utterance_plan(3, 4, 1.0, 12.0) == [(0.0, 12.0)]


def test_steady_frames_have_no_jitter_whatever_the_clock_offset() -> None:
    """Every frame 10 ms late (or a client clock an hour off): no jitter; one frame 80 ms
    later than the rest: that frame's jitter is 80 ms."""
    log = steady_log(4.0)
    assert max(jitter_ms(log)) == pytest.approx(0.0, abs=1e-3)
    log.epoch_offset += 3600
    assert max(jitter_ms(log)) == pytest.approx(0.0, abs=1e-3)
    log.frames[50].arrived += 0.08
    assert max(jitter_ms(log)) == pytest.approx(80.0, abs=1e-3)


def test_first_speech_frame_per_utterance() -> None:
    """Utterances sent from 101.0 and 103.0; their speech frames are frames 45-59 (arriving
    from 101.81) and 90-99 (from 103.61): 810 and 610 ms."""
    log = steady_log(6.0)
    for f in log.frames:
        f.speech = 45 <= f.index < 60 or 90 <= f.index < 100
    log.utterances = [(101.0, 101.5), (103.0, 103.5)]
    assert first_speech_ms(log) == [pytest.approx(810.0), pytest.approx(610.0)]


def test_interrupt_latencies_count_speech_until_the_next_utterance() -> None:
    """Interrupt at 102.0, acknowledged at 102.006; speech frames until 102.05 (then idle,
    then the next utterance's speech from 103.0): stop 60 ms, not the next utterance's."""
    log = steady_log(6.0)
    for f in log.frames:
        f.speech = f.arrived <= 102.06 or 103.2 <= f.arrived < 104.0
    log.utterances = [(100.0, float("nan")), (102.4, float("nan"))]
    log.interrupts = [Interrupt(sent=102.0, acked=102.006)]
    acks, stops = interrupt_ms(log)
    assert acks == [pytest.approx(6.0)]
    last_speech = max(f.arrived for f in log.frames if f.arrived <= 102.06)
    assert stops == [pytest.approx((last_speech - 102.0) * 1e3)]
    log.interrupts.append(Interrupt(sent=104.0))  # no speech after it, no answer yet
    acks, stops = interrupt_ms(log)
    assert len(acks) == 1 and stops[1] == 0.0


def test_summary_holds_25fps_only_with_every_speech_frame_and_the_rate() -> None:
    """All 50 speech frames of a 2 s utterance at 25 frames/s: holds; 5 missed (idle sent in
    their place): does not; frames at 20 frames/s: does not."""
    log = steady_log(8.0, speech=range(50, 100))
    log.utterances, log.expected_speech = [(101.2, 103.2)], 50
    good = summarize(log)
    assert good["fps"] == pytest.approx(25.0) and good["holds_25fps"]
    assert (good["speech_frames"], good["idle_frames"], good["missed_speech"]) == (50, 150, 0)
    for f in log.frames[60:65]:
        f.speech = False
    assert summarize(log)["missed_speech"] == 5 and not summarize(log)["holds_25fps"]
    slow = steady_log(8.0)
    for f in slow.frames:
        f.arrived = 100.0 + f.index * 0.05
    assert summarize(slow)["fps"] == pytest.approx(20.0) and not summarize(slow)["holds_25fps"]
    refused = LiveLog(session=1, epoch_offset=EPOCH, refused="server at capacity")
    result = aggregate([log, slow, refused])
    assert result["refused"] == 1 and result["min_fps"] == pytest.approx(20.0)
    assert result["all_hold_25fps"] is False
    text = table({**result, "seconds": 8.0, "speaking": 0.5, "cpu_per_s": {}})
    assert "refused: server at capacity" in text and "every session holds 25 fps: NO" in text


def test_a_sweep_is_a_table_a_figure_and_a_plot() -> None:
    rows = [{"sessions": s, "refused": 0, "min_fps": fps, "first_speech_ms_p99": lat,
             "jitter_ms_p99": 5.0, "all_hold_25fps": fps >= 24.5,
             "speech_frames": 200 - missed, "missed_speech": missed}
            for s, fps, lat, missed in ((1, 25.0, 700.0, 0), (2, 25.0, 720.0, 1),
                                        (4, 19.0, 2100.0, 50))]
    assert sweep_sizes("1,2,4", 9) == [1, 2, 4] and sweep_sizes(None, 3) == [3]
    with pytest.raises(SystemExit):
        sweep_sizes("1,x", 1)
    assert largest_holding(rows) == 2
    text = sweep_table(rows, live=True)
    assert text.splitlines()[2] == "| 1 | 0 | 25.0 | 0.0 | 700.0 | 5.0 | yes |"
    assert text.splitlines()[4] == "| 4 | 0 | 19.0 | 25.0 | 2100.0 | 5.0 | no |"
    svg = ET.fromstring(sweep_svg("live", [1, 2, 4], [25.0, 25.0, 19.0],
                                  [("first speech frame p99", [700.0, 720.0, 2100.0])]))
    lines = svg.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and all(len(line.get("points", "").split()) == 3 for line in lines)


def test_a_call_streams_its_pauses_as_silence() -> None:
    """--pauses-as-silence: one stream of the run's length, speech only in the utterances."""
    pcm = np.frombuffer(continuous_pcm([(0.5, 1.0)], 2.0, seed=0), "<i2")
    assert len(pcm) == 32000
    assert not pcm[:8000].any() and not pcm[24000:].any()
    assert np.abs(pcm[8000:24000]).max() > 1000
