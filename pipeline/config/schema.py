"""The config's schema: the one typed configuration of every role, loaded from config.yaml and validated once,
and the one place where the environment is read.

Key names and meanings follow the original Go server's config where they exist
(server.port, capacity.max_models, models.<id>.model_path, ...); keys the new design
needs sit beside them. Each field declares its own constraint (`setting(default, test,
message)`); a bad or unknown key fails at start with a message naming it. Relative paths
resolve against `models_root`, which resolves against the config file's directory (the
original joined models_root twice; we join once).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config.yaml"

Provider = Literal["auto", "cuda", "cpu", "openvino"]
UnetPrecision = Literal["auto", "fp32", "tf32", "fp16", "bf16"]
CompositeMode = Literal["synctalk", "stretch"]
CompositorDevice = Literal["cpu", "gpu"]


class ConfigError(ValueError):
    """A config file that cannot be served; the message names the bad key."""


def setting(default: Any, test: Callable[[Any], bool] | None = None, message: str = "",
            *, path: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A config field with its constraint: `test(value)` must hold, else `message`; or one
    of `choices`; `path`: an optional file, relative to the config's directory."""
    if choices:
        test, message = (lambda v: v in choices), "must be " + _or(choices)
    return field(default=default, metadata={"test": test, "message": message, "path": path})


def _or(words: tuple[str, ...]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _port_ok(p: int) -> bool:
    return 1 <= p <= 65535


PORT = "must be a port number 1-65535"


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path | None = setting(None, path=True)       # PEM certificate chain
    key_file: Path | None = setting(None, path=True)        # its PEM private key
    client_ca_file: Path | None = setting(None, path=True)  # set: mutual TLS

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class AuthConfig:
    # one bearer token per line ('#' comments); every RPC but grpc.health.v1 and every
    # WebSocket then needs one. Re-read on SIGHUP.
    tokens_file: Path | None = setting(None, path=True)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"          # gRPC and WebSocket listen address (0.0.0.0: every interface)
    port: int = setting(50053, _port_ok, PORT)  # gRPC; ":50053" (the Go form) is accepted
    max_message_size_mb: int = setting(100, lambda v: 1 <= v <= 2047, "must be 1-2047")
    ws_port: int = setting(8080, _port_ok, PORT)  # WebSocket /audio port
    # a request not answered by then fails with DEADLINE_EXCEEDED
    request_timeout_s: float = setting(60.0, lambda v: v > 0, "must be > 0")
    max_inflight_requests: int = setting(64, lambda v: v >= 1, "must be >= 1")
    # the requests' tensors in flight (a batch-32 with client-built visual is 79 MB)
    max_inflight_mb: int = setting(1024, lambda v: v >= 1, "must be >= 1")
    shutdown_grace_s: float = setting(5.0, lambda v: 0 <= v <= 60, "must be 0-60")
    # SIGTERM: /readyz says 503 at once and the box serves on this long, so a balancer takes
    # it out of rotation before the gRPC server stops (frontend/drain.py); 0: no balancer
    drain_delay_s: float = setting(0.0, lambda v: 0 <= v <= 30, "must be 0-30")
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class GpusConfig:
    count: int = setting(1, lambda v: 1 <= v <= 64, "must be 1-64")  # one gpu_worker per device
    # auto: CUDA when a device is present, else CPU workers on OpenVINO when it is
    # installed, else on ONNX Runtime's CPU provider (cpu)
    provider: Provider = setting("auto", choices=("auto", "cuda", "cpu", "openvino"))
    # CPU threads of a CPU worker's UNet runs (0: chosen from the measured CPU per frame of
    # the UNet against the other stages, gpu_worker/threads.py)
    intra_op_threads: int = setting(0, lambda v: v >= 0, "must be >= 0")
    # auto: fp32, but bf16 on OpenVINO where the CPU has bf16 units; fp32: exact float32
    # (TF32 off on CUDA); tf32: CUDA's TF32 matrix units for float32; fp16: the UNet
    # converted to float16 at load, its inputs and output kept float32; bf16: OpenVINO on a
    # CPU with bf16 units (refused elsewhere)
    unet_precision: UnetPrecision = setting("auto", choices=("auto", "fp32", "tf32", "fp16",
                                                             "bf16"))
    cuda_graphs: bool = False        # CUDA graphs for the UNet (CUDA only; ignored on the CPU)


@dataclass(frozen=True)
class BatchingConfig:
    # frames of concurrent requests coalesced into one UNet run (0: 32 on CUDA; 1, no
    # coalescing, on CPU, where a larger batch is no faster per frame and gathering copies)
    max_batch_frames: int = setting(0, lambda v: 0 <= v <= 1024, "must be 0 (auto) or 1-1024")
    # how long a run waits for more requests (0: only those queued)
    max_queue_delay_ms: float = setting(0.0, lambda v: 0 <= v <= 1000, "must be 0-1000")


@dataclass(frozen=True)
class CapacityConfig:
    max_models: int = setting(40, lambda v: v >= 1, "must be >= 1")  # on the whole server
    max_memory_gb: float = setting(20.0, lambda v: v > 0, "must be > 0")  # per device
    # unload a model unused this long (0 = never)
    idle_timeout_minutes: float = setting(60.0, lambda v: v >= 0, "must be >= 0")
    # the original's "lfu" never counted usage: LRU only
    eviction_policy: Literal["lru"] = setting(
        "lru", lambda v: v == "lru", "must be lru (the only policy that uses real usage)")


@dataclass(frozen=True)
class OutputConfig:
    jpeg_quality: int = setting(75, lambda v: 0 <= v <= 100, "must be 0-100")  # 0 means 75


@dataclass(frozen=True)
class CompositorConfig:
    pool_size: int = setting(2, lambda v: 1 <= v <= 256, "must be 1-256")  # paste + JPEG
    # where a rendered frame is pasted and JPEG-encoded: cpu, by the compositor pool; gpu, by
    # each gpu_worker on its device (the paste as an ONNX graph on the CUDA provider, the JPEG
    # by nvImageCodec: the gpu-compositor extra), the pool then encoding only live sessions'
    # idle frames. gpu on a box without CUDA or nvImageCodec fails at start, saying which.
    device: CompositorDevice = setting("cpu", choices=("cpu", "gpu"))
    # each compositor keeps the backgrounds it has encoded (per JPEG quality), so a frame's
    # JPEG encodes only the segments around its mouth: MB per compositor, least recently
    # used out first (a 250-frame 720p avatar: ~10-40 MB); 0 encodes every frame whole
    background_jpeg_cache_mb: int = setting(256, lambda v: v >= 0, "must be >= 0")


LOCAL_ORIGINS = tuple(f"{scheme}://{host}{port}" for scheme in ("http", "https")
                      for host in ("localhost", "127.0.0.1", "[::1]") for port in ("", ":*"))
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*)"
                     r"(?::(\d{1,5}|\*))?", re.IGNORECASE)


def parse_origin(text: str) -> tuple[str, str, str] | None:
    """(scheme, host, port) of a browser Origin or an allowed-origin pattern (port "" when
    absent, "*" for any in a pattern; a pattern's host may start with "*." for any
    subdomain), lower-cased; None for anything else (user info, a path, a non-numeric
    port)."""
    match = _ORIGIN.fullmatch(text.strip())
    if match is None:
        return None
    scheme, host, port = match.groups()
    return scheme.lower(), host.lower(), port or ""


@dataclass(frozen=True)
class StreamingConfig:
    default_model: str = ""           # model of a session that names none ("" = first configured)
    # a browser Origin must match one of these exactly (scheme://host[:port], port * for
    # any, host *.example.com for any subdomain); no Origin header is accepted
    allowed_origins: tuple[str, ...] = setting(
        LOCAL_ORIGINS, lambda v: all(parse_origin(o) for o in v),
        "each must be scheme://host[:port] (port a number or *)")
    # MAX_CLIENTS overrides; beyond it the handshake is refused
    max_clients: int = setting(100, lambda v: v >= 1, "must be >= 1")
    # FLUSH_TIMEOUT overrides ("2s", "500ms"): silence -> flush
    flush_timeout_s: float = setting(2.0, lambda v: v > 0, "must be > 0")
    max_message_bytes: int = setting(1 << 20, lambda v: v >= 1024, "must be >= 1024")
    # per client, with a burst of 2 s worth
    rate_limit_messages_per_s: float = setting(200.0, lambda v: v > 0, "must be > 0")
    # a client that does not take a frame by then is closed
    send_timeout_s: float = setting(5.0, lambda v: v > 0, "must be > 0")
    # no message from the client this long: close 1000 "idle"
    idle_timeout_s: float = setting(120.0, lambda v: v > 0, "must be > 0")
    # sessions of one client address (0: no limit)
    max_sessions_per_address: int = setting(16, lambda v: v >= 0, "must be >= 0 (0: no limit)")
    # live mode: frames whose audio window the voice-activity detector calls silence skip
    # the UNet and show the idle frame (the avatar's own background) instead
    skip_silent_frames: bool = False
    # speech frames the box renders per second, for admitting live sessions; 0: measured
    # from the stage costs of the requests served (updated as it runs)
    capacity_fps: float = setting(0.0, lambda v: v >= 0, "must be >= 0 (0: measured)")
    # the share of the time a live session is expected to speak: each open one counts this
    # much of 25 frames/s against capacity when admitting the next (0: only speech under way)
    live_speech_share: float = setting(0.5, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    # a live session whose speech frames come late this long gets a status message ...
    low_fps_grace_s: float = setting(3.0, lambda v: v > 0, "must be > 0")
    # ... and is closed (1013) when this is set
    close_below_real_time: bool = False


@dataclass(frozen=True)
class OpsConfig:
    # ZeroMQ ops socket; "" = ipc://<runtime.dir>/<instance>-ops.ipc
    endpoint: str = setting("", lambda v: not v or v.startswith(("ipc://", "tcp://127.",
                                                                 "tcp://localhost:")),
                            "must be ipc://PATH or tcp on loopback (tcp://127.0.0.1:PORT)")
    metrics_host: str = "127.0.0.1"   # Prometheus /metrics listen address
    metrics_port: int = setting(9464, lambda v: 0 <= v <= 65535, "must be 0 (off) or a port")


@dataclass(frozen=True)
class RuntimeConfig:
    dir: Path = Path("run")  # ipc:// sockets live here (relative: to the config's directory)
    # names the ipc endpoints and shared-memory arenas
    instance: str = setting("default", lambda v: v.replace("_", "").isalnum(),
                            "must be letters, digits or _ (it is part of segment and socket names)")
    # request arena in /dev/shm (audio + UNet output, + visual when the client sends it)
    arena_mb: int = setting(1024, lambda v: v >= 64, "must be >= 64")
    # roles report liveness to the frontend this often
    heartbeat_s: float = setting(0.5, lambda v: 0 < v <= 10, "must be in (0, 10]")
    start_timeout_s: float = setting(120.0, lambda v: v > 0, "must be > 0")
    # `lipsync serve` restarts a dead role after 0.5 s, doubling up to this
    restart_backoff_max_s: float = setting(30.0, lambda v: v >= 0.5, "must be >= 0.5")


_REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class ModelConfig:
    model_id: str
    model_path: Path                  # the avatar's UNet ONNX
    background_dir: Path              # frame_0000.jpg ... (png/jpg/jpeg)
    crop_rects_path: Path             # JSON list of [x1, y1, x2, y2]
    num_frames: int = setting(_REQUIRED, lambda v: v >= 1, "must be >= 1")
    source_video: Path | None = None  # frames are extracted from it when background_dir is empty
    # the model's own audio encoder (a training run's); None: the shared audio_encoder_path
    audio_encoder_path: Path | None = None
    preload_model: bool = False
    preload_backgrounds: bool = False
    preferred_gpu: int = -1           # -1: least-loaded device
    composite_mode: CompositeMode = setting("synctalk", choices=("synctalk", "stretch"))


@dataclass(frozen=True)
class Config:
    path: Path | None                 # the file this came from (None: built in code)
    models_root: Path
    audio_encoder_path: Path          # the shared audio-encoder ONNX
    server: ServerConfig = field(default_factory=ServerConfig)
    gpus: GpusConfig = field(default_factory=GpusConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    compositor: CompositorConfig = field(default_factory=CompositorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)

    @property
    def default_model(self) -> str:
        return self.streaming.default_model or next(iter(self.models), "")

    @property
    def jpeg_quality(self) -> int:
        return self.output.jpeg_quality or 75

    def audio_encoder_of(self, model: ModelConfig) -> Path:
        """The audio encoder `model` runs with: its own, else the shared one."""
        return model.audio_encoder_path or self.audio_encoder_path

    def with_ports(self, grpc_port: int | None = None, ws_port: int | None = None,
                   metrics_port: int | None = None) -> Config:
        """The same config with the command line's port overrides applied."""
        server, ops = self.server, self.ops
        if grpc_port is not None:
            server = dataclasses.replace(server, port=_port("--grpc-port", grpc_port))
        if ws_port is not None:
            server = dataclasses.replace(server, ws_port=_port("--ws-port", ws_port))
        if metrics_port is not None:
            if metrics_port != 0:
                _port("--metrics-port", metrics_port)
            ops = dataclasses.replace(ops, metrics_port=metrics_port)
        return dataclasses.replace(self, server=server, ops=ops)


def _port(where: str, value: Any) -> int:
    """Accept 50053, "50053" and the Go listen form ":50053"."""
    if isinstance(value, str):
        value = value.rsplit(":", 1)[-1]
        if not value.isdigit():
            raise ConfigError(f"{where}: expected a port like 50053 or \":50053\"")
        value = int(value)
    port = _int(where, value)
    _check(where, where.endswith("metrics_port") or _port_ok(port), PORT)
    return port

def _check(where: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")

def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value
