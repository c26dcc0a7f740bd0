"""pipeline.integrations.timeline: which audio goes out with which live frame, and the 16 kHz
stream the server gets, frame-aligned."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.integrations.timeline import SERVER_FRAME, AudioTimeline, frame_samples

RATE = 24000
PER_FRAME = 960  # 40 ms at 24 kHz


def tone(frames: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, int(frames * PER_FRAME)).astype(np.int16)


def test_a_run_is_sent_at_16_khz_and_padded_to_whole_frames() -> None:
    """2.5 frames of 24 kHz audio: 16 kHz bytes as they come, then pad() completes exactly three
    frames of 640 samples; the half frame goes out padded with silence."""
    timeline = AudioTimeline(RATE)
    audio = tone(2.5)
    sent = timeline.add(audio[:1000]) + timeline.add(audio[1000:])
    sent += timeline.pad()
    assert len(sent) == 3 * SERVER_FRAME * 2
    assert sorted(timeline.pending) == [0, 1, 2] and timeline.next_frame == 3
    assert timeline.pending[2] == audio[2 * PER_FRAME:].tobytes() + bytes(2 * PER_FRAME // 2)
    assert timeline.pad() == b""  # nothing more to pad


def test_the_first_speech_frame_anchors_and_each_frame_takes_its_own_audio() -> None:
    """Live frames 40, 41 idle (nothing yet), 42.. speech: frame 42 takes stream frame 0, 43
    frame 1, ...; once all is out the anchor is forgotten and the next utterance is anchored by
    its own first speech frame."""
    timeline = AudioTimeline(RATE)
    first = tone(3, seed=1)
    timeline.add(first)
    timeline.pad()
    assert timeline.shown(40, False) == (b"", 0)
    assert timeline.shown(41, False) == (b"", 0)
    out = [timeline.shown(n, True)[0] for n in (42, 43, 44)]
    assert out == [first[k * PER_FRAME:(k + 1) * PER_FRAME].tobytes() for k in range(3)]
    assert timeline.anchor is None and timeline.idle
    second = tone(2, seed=2)
    timeline.add(second)
    timeline.pad()
    assert timeline.shown(45, False) == (b"", 0)
    assert timeline.shown(60, True)[0] == second[:PER_FRAME].tobytes()
    assert timeline.shown(61, True)[0] == second[PER_FRAME:].tobytes()


def test_a_late_speech_frame_still_takes_its_audio() -> None:
    """The server shows an idle frame where a speech frame was not ready: its audio goes with
    that idle frame, and the next speech frame takes only its own."""
    timeline = AudioTimeline(RATE)
    audio = tone(3, seed=3)
    timeline.add(audio)
    assert timeline.shown(10, True)[0] == audio[:PER_FRAME].tobytes()
    assert timeline.shown(11, False)[0] == audio[PER_FRAME:2 * PER_FRAME].tobytes()
    assert timeline.shown(12, True)[0] == audio[2 * PER_FRAME:].tobytes()


def test_frames_passed_over_give_their_audio_to_the_next() -> None:
    """A frame that never came (the stream jumped) does not lose its audio: the next frame
    takes every frame's audio up to its own."""
    timeline = AudioTimeline(RATE)
    audio = tone(4, seed=4)
    timeline.add(audio)
    timeline.shown(5, True)
    assert timeline.shown(8, True)[0] == audio[PER_FRAME:].tobytes()


def test_a_segment_ends_with_its_last_audio() -> None:
    """end_segment: the frame that takes the turn's last audio says so; a turn whose audio is
    all out already ends at once."""
    timeline = AudioTimeline(RATE)
    assert timeline.end_segment() is True
    timeline.add(tone(1.5, seed=5))
    timeline.pad()
    assert timeline.end_segment() is False
    assert timeline.shown(3, True)[1] == 0
    assert timeline.shown(4, True)[1] == 1


def test_reset_drops_everything() -> None:
    """An interrupt (reset): no audio left, the stream starts at frame 0, no anchor."""
    timeline = AudioTimeline(RATE)
    timeline.add(tone(2.5, seed=6))
    timeline.shown(7, True)
    timeline.reset()
    assert timeline.idle and timeline.next_frame == 0 and timeline.anchor is None
    assert timeline.shown(9, True) == (b"", 0)


def test_take_all_gives_what_is_left_padded() -> None:
    """take_all (the server is gone): every sample not out yet, the last frame padded, and the
    segments that ended; the timeline is empty after."""
    timeline = AudioTimeline(RATE)
    audio = tone(1.5, seed=7)
    timeline.add(audio)
    timeline.pad()
    timeline.end_segment()
    out, ended = timeline.take_all()
    assert out == audio.tobytes() + bytes(PER_FRAME) and ended == 1
    assert timeline.idle


def test_16_khz_audio_is_sent_unchanged() -> None:
    """At the server's own rate the samples go as they are."""
    timeline = AudioTimeline(16000)
    audio = np.arange(-3000, 3000, dtype=np.int16)
    sent = timeline.add(audio) + timeline.pad()
    back = np.frombuffer(sent, "<i2")
    assert len(back) == 10 * SERVER_FRAME
    assert np.abs(back[:len(audio)].astype(int) - audio).max() <= 1 and not back[len(audio):].any()


@pytest.mark.parametrize("rate", [0, 44101, -16000])
def test_rates_without_whole_40_ms_frames_are_refused(rate: int) -> None:
    """A rate whose 40 ms is not a whole number of samples is a clear error."""
    with pytest.raises(ValueError, match="unsupported sample rate"):
        frame_samples(rate)


def speech_after_silence() -> np.ndarray:
    """0.3 s of silence, then 1 s of speech-like sound, int16 at 16 kHz."""
    from pipeline.client import speech_like_audio

    audio = np.concatenate([np.zeros(4800, np.float32), speech_like_audio(1.0, seed=8)])
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


def test_the_servers_speech_start_places_late_first_frames() -> None:
    """The server says live frame 112 shows the speech onset (0.3 s in: stream frame 7 or 8):
    the anchor is then known before any speech frame, so idle frames standing in for speech
    frames not rendered in time take their audio, from live frame 105 = stream frame 0 on."""
    timeline = AudioTimeline(16000)
    audio = speech_after_silence()
    timeline.add(audio)
    timeline.pad()
    (onset,) = timeline.onsets.onsets
    assert 4320 <= onset <= 5760  # where the voice begins, to a 30 ms window
    timeline.speech_started(105 + onset // SERVER_FRAME)
    assert timeline.shown(104, False) == (b"", 0)
    assert timeline.shown(105, False)[0] == audio[:SERVER_FRAME].tobytes()
    assert timeline.shown(106, True)[0] == audio[SERVER_FRAME:2 * SERVER_FRAME].tobytes()


def test_a_speech_start_that_cannot_be_this_utterances_is_ignored() -> None:
    """A speech_start putting the anchor after the first speech frame (the detectors disagreed)
    is dropped: the first speech frame anchors."""
    timeline = AudioTimeline(16000)
    audio = speech_after_silence()
    timeline.add(audio)
    timeline.pad()
    timeline.speech_started(500)
    assert timeline.shown(50, True)[0] == audio[:SERVER_FRAME].tobytes()
    assert timeline.anchor == 50 and not timeline.hints
