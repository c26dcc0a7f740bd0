"""`lipsync render`: a WAV in, a lip-synced MP4 with its audio track out.

The audio goes through a running server's StreamAudio RPC as fast as the server takes it;
the JPEG frames go into ffmpeg (the static binary of imageio-ffmpeg) as they arrive, so no
more than a few frames are ever held in memory. ffmpeg writes H.264 (yuv420p) at 25 fps
plus AAC from the WAV into a temporary file beside OUT, renamed onto OUT only when every
frame arrived in order and ffmpeg succeeded: a failed render leaves no broken OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from pipeline.client import add_security_arguments, apply_security_arguments
from pipeline.config import grpc_server_address
from pipeline.synctalk import SAMPLE_RATE, VIDEO_FPS

PROG = "lipsync render"
DEFAULT_ADDRESS = "localhost:50053"
FPS = VIDEO_FPS
SERVER_RATE = SAMPLE_RATE    # the server's clock: frame i shows 16 kHz samples [640 i, 640 (i+1))
FRAME_SAMPLES = SERVER_RATE // FPS
CHUNK_S = 0.1                # audio per request message
# The server refuses a session whose unrendered audio exceeds 60 s (its stream sessions'
# backlog limit); sending "as fast as it takes it" means staying under that.
MAX_AHEAD_S = 20.0


class RenderError(Exception):
    """The render failed; str() is the one line shown to the user."""


@dataclass(frozen=True)
class RenderResult:
    frames: int
    seconds: float           # wall-clock time of the render
    path: Path


def default_address() -> str:
    """GRPC_SERVER (as the seed's tools take it) or localhost:50053."""
    return grpc_server_address(DEFAULT_ADDRESS)


def expected_frames(frames: int, sample_rate: int) -> int:
    """Frames the server renders for `frames` samples at `sample_rate`: ceil(25 x seconds)."""
    samples_16k = frames if sample_rate == SERVER_RATE else round(frames * SERVER_RATE / sample_rate)
    return -(-samples_16k // FRAME_SAMPLES)


def render_wav(wav: Path, out: Path, address: str, model_id: str = "",
               progress: bool = True) -> RenderResult:
    """Render `wav` through the server at `address` into the MP4 `out`.

    `model_id` empty: the server's default streaming model. Raises RenderError.
    """
    import soundfile as sf
    from tqdm import tqdm

    t0 = time.perf_counter()
    wav, out = Path(wav), Path(out)
    if not wav.is_file():
        raise RenderError(f"WAV not found: {wav}")
    try:
        audio = sf.SoundFile(str(wav))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise RenderError(f"cannot read {wav}: {_soundfile_reason(exc)}") from None
    with audio:
        if audio.frames <= 0:
            raise RenderError(f"{wav} holds no audio samples")
        out_dir = out.resolve().parent
        if not out_dir.is_dir():
            raise RenderError(f"output directory does not exist: {out_dir}")
        total = expected_frames(audio.frames, audio.samplerate)
        # Resampling may round the stream's length by a sample: one frame either way at an edge.
        slack = 0 if audio.samplerate == SERVER_RATE else 1
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part.mp4", dir=out_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would be private to the renamed OUT
        try:
            with tqdm(total=total, desc="rendering", unit="frame",
                      disable=None if progress else True) as bar:
                frames = _render_into(audio, wav, tmp, address, model_id, bar)
            if abs(frames - total) > slack:
                raise RenderError(f"server sent {frames} frames for {audio.frames / audio.samplerate:.3f} s "
                                  f"of audio, expected {total}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return RenderResult(frames=frames, seconds=time.perf_counter() - t0, path=out)


def _render_into(audio, wav: Path, tmp: Path, address: str, model_id: str, bar) -> int:
    """Stream the audio, pipe the frames into ffmpeg writing `tmp`; returns the frame count."""
    from pipeline.client import channel
    from pipeline.rpc import monolithic_pb2_grpc as pb_grpc

    sender = _AudioSender(audio, model_id)
    encoder = _Encoder(wav, tmp, audio.channels)
    frames = 0
    flushed: int | None = None
    try:
        with channel(address, model_id) as ch:  # the model is in the first message only
            responses = pb_grpc.MonolithicServiceStub(ch).StreamAudio(sender.requests())
            try:
                for response in responses:
                    if response.WhichOneof("message") == "frame":
                        frame = response.frame
                        if frame.frame_index != frames:
                            raise RenderError(f"frames out of order: got frame {frame.frame_index}, "
                                              f"expected {frames}")
                        encoder.write(frame.jpeg)
                        frames += 1
                        sender.rendered(frames)
                        bar.update(1)
                        continue
                    status = _parse_status(response.status_json)
                    if status.get("type") == "error":
                        raise RenderError(f"server error: {status.get('message', 'unknown error')}")
                    if status.get("type") == "flushed":
                        flushed = int(status.get("frames", -1))
            except grpc.RpcError as exc:
                raise _rpc_error(exc, address, frames) from None
            finally:
                responses.cancel()  # a no-op after a normal end; stops the stream on an error
        if sender.error is not None:
            raise RenderError(f"cannot read {wav}: {_soundfile_reason(sender.error)}")
        if flushed is None:
            raise RenderError(f"the server ended the stream before rendering every frame "
                              f"({frames} received)")
        if flushed != frames:
            raise RenderError(f"the server reported {flushed} frames but sent {frames}")
        if frames == 0:
            raise RenderError("the server rendered no frames")
        encoder.finish()
    finally:
        sender.stop()
        encoder.abort()
    return frames


class _AudioSender:
    """The request stream: config, ~100 ms f32le chunks read from the file as they are
    sent, FLUSH, then the end. Runs on gRPC's thread; it stays at most MAX_AHEAD_S of
    audio ahead of the frames received so the server's backlog limit never trips."""

    def __init__(self, audio, model_id: str) -> None:
        self.audio = audio
        self.model_id = model_id
        self.chunk = max(1, int(audio.samplerate * CHUNK_S))
        self.error: Exception | None = None
        self._rendered = 0
        self._stopped = False
        self._cond = threading.Condition()

    def rendered(self, frames: int) -> None:
        with self._cond:
            self._rendered = frames
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def requests(self) -> Iterator[object]:
        from pipeline.rpc import monolithic_pb2 as pb

        yield pb.StreamAudioRequest(config=pb.StreamConfig(
            model_id=self.model_id, format="f32le", sample_rate=self.audio.samplerate))
        sent = 0
        while True:
            with self._cond:
                while (not self._stopped and
                       sent / self.audio.samplerate - self._rendered / FPS > MAX_AHEAD_S):
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                block = self.audio.read(self.chunk, dtype="float32", always_2d=True)
            except Exception as exc:  # reported by the main thread, which knows the file
                self.error = exc
                return
            if len(block) == 0:
                break
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            np.clip(mono, -1.0, 1.0, out=mono)
            sent += len(mono)
            yield pb.StreamAudioRequest(audio=np.ascontiguousarray(mono, "<f4").tobytes())
        yield pb.StreamAudioRequest(control=pb.STREAM_CONTROL_FLUSH)


class _Encoder:
    """ffmpeg: JPEGs on stdin + the WAV -> H.264/AAC MP4. stderr goes to a temporary file
    (a pipe nobody reads could fill up and stall ffmpeg)."""

    def __init__(self, wav: Path, out: Path, channels: int) -> None:
        import imageio_ffmpeg

        self.out = out
        self.log = tempfile.TemporaryFile()
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "image2pipe", "-c:v", "mjpeg", "-framerate", str(FPS), "-i", "-",
            "-i", f"file:{wav.resolve()}",
            "-map", "0:v:0", "-map", "1:a:0",
            # yuv420p needs even dimensions: drop a last odd row/column rather than scale.
            # JPEGs are full range; players expect limited-range H.264, so convert explicitly
            # (else ffmpeg keeps full range, which many players show washed out).
            "-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2,scale=out_range=tv,format=yuv420p",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
            "-color_range", "tv", "-r", str(FPS),
            "-c:a", "aac", "-b:a", "128k", *(["-ac", "2"] if channels > 2 else []),
            "-movflags", "+faststart", "-f", "mp4", f"file:{out.resolve()}",
        ]
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self.log)
        except OSError as exc:
            self.log.close()
            raise RenderError(f"cannot start ffmpeg: {exc.strerror or exc}") from None

    def write(self, jpeg: bytes) -> None:
        assert self.proc.stdin is not None  # opened with stdin=PIPE
        try:
            self.proc.stdin.write(jpeg)
        except (BrokenPipeError, OSError):
            self.proc.wait()
            raise RenderError(f"ffmpeg failed: {self._last_line()}") from None

    def finish(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        code = self.proc.wait()
        if code != 0:
            raise RenderError(f"ffmpeg failed (exit {code}): {self._last_line()}")

    def abort(self) -> None:
        """Idempotent: kill ffmpeg if it still runs and release the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.log.close()

    def _last_line(self) -> str:
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        return lines[-1] if lines else "no message"


def _parse_status(text: str) -> dict:
    try:
        status = json.loads(text)
    except ValueError:
        raise RenderError(f"server sent a malformed status message: {text[:200]!r}") from None
    if not isinstance(status, dict):
        raise RenderError(f"server sent a malformed status message: {text[:200]!r}")
    return status


def _rpc_error(exc: grpc.RpcError, address: str, frames: int) -> RenderError:
    """What a failed stream means, `frames` into the render."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details:
        return RenderError(f"the server at {address} shut down during the render; no output "
                           "was written")
    if code == grpc.StatusCode.UNAVAILABLE and frames:
        # reached, then gone: a stopping server's status can lose the race with its closing
        # connection (this side's next send fails first), as can a failed network
        return RenderError(f"the connection to the server at {address} was lost after {frames} "
                           f"frames (the server shut down, or the network failed): {details}; "
                           "no output was written")
    if code == grpc.StatusCode.UNAVAILABLE:
        return RenderError(f"cannot reach the server at {address} (is `lipsync serve` running?): "
                           f"{details}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RenderError(f"the server at {address} has no StreamAudio RPC: {details}")
    name = code.name if code is not None else "error"
    return RenderError(f"server at {address} failed the stream ({name}): {details}")


def _soundfile_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    # libsndfile's messages repeat the path: keep the part after it
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text


def cmd_render(args: argparse.Namespace) -> int:
    apply_security_arguments(args)
    try:
        result = render_wav(args.wav, args.out, args.address, args.model, progress=not args.quiet)
    except RenderError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} not written", file=sys.stderr)
        return 130
    seconds = result.frames / FPS
    print(f"{result.path}: {result.frames} frames ({seconds:.2f} s of video) in "
          f"{result.seconds:.2f} s ({result.frames / max(result.seconds, 1e-9):.1f} frames/s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `render` subcommand to the `lipsync` parser."""
    p = sub.add_parser("render", help="render a WAV into a lip-synced MP4 through a running server",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--wav", type=Path, required=True,
                   help="speech audio (WAV or any format libsndfile reads; any rate, mixed to mono)")
    p.add_argument("--out", type=Path, required=True, help="the MP4 to write (replaced if present)")
    p.add_argument("--model", default="", metavar="ID",
                   help="model id (default: the server's default streaming model)")
    p.add_argument("--address", default=default_address(), metavar="HOST:PORT",
                   help=f"the server (default: $GRPC_SERVER or {DEFAULT_ADDRESS}; now {default_address()})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_security_arguments(p)
    p.set_defaults(func=cmd_render)
