"""`lipsync render` against a real server: the MP4 it writes and its one-line errors."""
from __future__ import annotations

import argparse
import math
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf

from pipeline.bench.local_server import ServerProcess, free_port
from pipeline.cli.render import register, render_wav
from pipeline.client import speech_like_audio

SECONDS = 1.3
FRAMES = math.ceil(25 * SECONDS)  # 33
WIDTH, HEIGHT = 1280, 720         # the demo avatar's frames
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def server(start_server) -> ServerProcess:
    """One `lipsync serve` (CPU) for the module."""
    return start_server()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipsync")
    register(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(*argv: str) -> int:
    args = parser().parse_args(["render", *argv])
    return args.func(args)


def write_wav(path: Path, sample_rate: int, channels: int = 1) -> Path:
    audio = speech_like_audio(SECONDS, sample_rate)
    if channels > 1:
        audio = np.stack([audio * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    sf.write(path, audio, sample_rate, subtype="PCM_16")
    return path


def probe(path: Path) -> str:
    """`ffmpeg -i` stderr: the container's stream lines."""
    return subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True).stderr


def decoded_video_frames(path: Path) -> int:
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                          "-pix_fmt", "gray", "-"], capture_output=True, check=True).stdout
    assert len(raw) % (WIDTH * HEIGHT) == 0
    return len(raw) // (WIDTH * HEIGHT)


def decoded_audio_seconds(path: Path) -> float:
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a", "-f", "f32le",
                          "-ac", "1", "-ar", "16000", "-"], capture_output=True, check=True).stdout
    return len(raw) / 4 / 16000


def check_mp4(path: Path) -> None:
    info = probe(path)
    video = [line for line in info.splitlines() if "Video:" in line]
    audio = [line for line in info.splitlines() if "Audio:" in line]
    assert len(video) == 1 and len(audio) == 1, info
    assert re.search(r"Video: h264\b", video[0]) and "yuv420p" in video[0], video[0]
    assert f"{WIDTH}x{HEIGHT}" in video[0] and re.search(r"\b25 fps\b", video[0]), video[0]
    assert re.search(r"Audio: aac\b", audio[0]), audio[0]
    assert decoded_video_frames(path) == FRAMES
    assert decoded_audio_seconds(path) == pytest.approx(SECONDS, abs=0.05)


def test_render_16k_mono_writes_h264_aac_mp4(server: ServerProcess, tmp_path: Path) -> None:
    """A 1.3 s 16 kHz WAV becomes an MP4 of 33 H.264 1280x720 frames at 25 fps plus 1.3 s of AAC."""
    wav = write_wav(tmp_path / "speech.wav", 16000)
    out = tmp_path / "speech.mp4"
    result = render_wav(wav, out, server.address, "demo", progress=False)
    assert result.frames == FRAMES and result.path == out
    check_mp4(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp file renamed


def test_render_44k_stereo_through_cli(server: ServerProcess, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A 44.1 kHz stereo WAV (mixed to mono, resampled by the server) renders the same frame count."""
    wav = write_wav(tmp_path / "speech44.wav", 44100, channels=2)
    out = tmp_path / "speech44.mp4"
    assert run_cli("--wav", str(wav), "--out", str(out), "--address", server.address) == 0
    assert f"{FRAMES} frames" in capsys.readouterr().out
    check_mp4(out)


def test_missing_wav_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A WAV that does not exist: exit 2, one stderr line naming it, no output file."""
    out = tmp_path / "x.mp4"
    assert run_cli("--wav", str(tmp_path / "nope.wav"), "--out", str(out),
                   "--address", "127.0.0.1:1") == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"lipsync render: WAV not found: {tmp_path / 'nope.wav'}"]
    assert not out.exists()


def test_unreadable_wav_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not audio: exit 2 and one line saying it cannot be read."""
    wav = tmp_path / "bad.wav"
    wav.write_bytes(b"this is not a wav file" * 10)
    assert run_cli("--wav", str(wav), "--out", str(tmp_path / "x.mp4"),
                   "--address", "127.0.0.1:1") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lipsync render: cannot read {wav}: ")


def test_unreachable_server_names_the_address(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening at --address: exit 2, one line naming the address, no output file."""
    wav = write_wav(tmp_path / "speech.wav", 16000)
    out = tmp_path / "x.mp4"
    address = f"127.0.0.1:{free_port()}"
    assert run_cli("--wav", str(wav), "--out", str(out), "--address", address, "--quiet") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"lipsync render: cannot reach the server at {address}")
    assert list(tmp_path.iterdir()) == [wav]


def test_unknown_model_reports_the_server_error(server: ServerProcess, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --model: exit 2 with the server's error message, and no output file."""
    wav = write_wav(tmp_path / "speech.wav", 16000)
    out = tmp_path / "x.mp4"
    assert run_cli("--wav", str(wav), "--out", str(out), "--address", server.address,
                   "--model", "no-such-model") == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["lipsync render: server error: Model 'no-such-model' not found in configuration"]
    assert list(tmp_path.iterdir()) == [wav]


def test_address_defaults_to_grpc_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """--address defaults to $GRPC_SERVER when set, else localhost:50053."""
    monkeypatch.setenv("GRPC_SERVER", "example.org:1234")
    assert parser().parse_args(["render", "--wav", "a", "--out", "b"]).address == "example.org:1234"
    monkeypatch.delenv("GRPC_SERVER")
    assert parser().parse_args(["render", "--wav", "a", "--out", "b"]).address == "localhost:50053"


def test_ffmpeg_failure_reports_its_last_line(tmp_path: Path) -> None:
    """ffmpeg refusing its input is a RenderError carrying ffmpeg's own last stderr line."""
    from pipeline.cli.render import RenderError, _Encoder

    wav = write_wav(tmp_path / "speech.wav", 16000)
    encoder = _Encoder(wav, tmp_path / "x.mp4", channels=1)
    try:
        with pytest.raises(RenderError, match=r"^ffmpeg failed.*: \S") as failure:
            encoder.write(b"not a jpeg" * 1000)
            encoder.finish()
    finally:
        encoder.abort()
    assert "\n" not in str(failure.value) and "no message" not in str(failure.value)
