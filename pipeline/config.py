"""The one typed configuration of every role, loaded from config.yaml and validated once.

Key names and meanings follow the original Go server's config where they exist
(server.port, capacity.max_models, models.<id>.model_path, ...); keys the new design
needs sit beside them. A bad or unknown key fails at start with a message naming it.
Relative paths resolve against `models_root`, which resolves against the config file's
directory (the original joined models_root twice; we join once).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config.yaml"

Provider = Literal["auto", "cuda", "cpu"]
CompositeMode = Literal["synctalk", "stretch"]


class ConfigError(ValueError):
    """A config file that cannot be served; the message names the bad key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"            # gRPC listen address
    port: int = 50053                # gRPC port; ":50053" (the Go form) is accepted
    max_message_size_mb: int = 100   # gRPC max send/receive message size (MiB)
    ws_port: int = 8080              # WebSocket /audio port
    request_timeout_s: float = 60.0  # a request not answered by then fails with DEADLINE_EXCEEDED
    max_inflight_requests: int = 64  # admission bound; beyond it RESOURCE_EXHAUSTED
    shutdown_grace_s: float = 5.0    # SIGTERM: in-flight work gets this long to finish
    drain_delay_s: float = 0.0       # SIGTERM: keep serving this long first, /readyz 503, so a
                                     # balancer takes the box out (frontend/drain.py); 0: none


@dataclass(frozen=True)
class GpusConfig:
    count: int = 1                   # gpu_worker processes, one per device
    provider: Provider = "auto"      # auto: CUDA when a device is present, else CPU workers
    intra_op_threads: int = 0        # ONNX Runtime CPU threads per session (0 = ORT default)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_frames: int = 0        # frames of concurrent requests coalesced into one UNet run
                                     # (0: 32 on CUDA; 1, no coalescing, on CPU, where a larger
                                     # batch is no faster per frame and gathering costs copies)
    max_queue_delay_ms: float = 0.0  # how long a run waits for more requests (0: only those queued)


@dataclass(frozen=True)
class CapacityConfig:
    max_models: int = 40             # models loaded on the whole server
    max_memory_gb: float = 20.0      # per-device memory budget for models
    idle_timeout_minutes: float = 60.0  # unload a model unused this long (0 = never)
    eviction_policy: Literal["lru"] = "lru"  # the original's "lfu" never counted usage: LRU only


@dataclass(frozen=True)
class OutputConfig:
    jpeg_quality: int = 75           # 0 means 75, as in the original


@dataclass(frozen=True)
class CompositorConfig:
    pool_size: int = 2               # compositor processes (paste + JPEG)


LOCAL_ORIGINS = ("http://localhost", "http://localhost:*", "https://localhost",
                 "https://localhost:*", "http://127.0.0.1", "http://127.0.0.1:*",
                 "https://127.0.0.1", "https://127.0.0.1:*", "http://[::1]:*")


@dataclass(frozen=True)
class StreamingConfig:
    default_model: str = ""           # model of a session that names none ("" = first configured)
    # a browser Origin must match one of these (fnmatch patterns); no Origin header (a
    # non-browser client) is accepted
    allowed_origins: tuple[str, ...] = LOCAL_ORIGINS
    max_clients: int = 100            # MAX_CLIENTS overrides; beyond it the handshake is refused
    batch_size: int = 10              # BATCH_SIZE overrides: audio messages per logged batch
    flush_timeout_s: float = 2.0      # FLUSH_TIMEOUT overrides ("2s", "500ms"): silence -> flush
    max_message_bytes: int = 1 << 20  # one audio message
    rate_limit_messages_per_s: float = 200.0  # per client, with a burst of 2 s worth
    send_timeout_s: float = 5.0       # a client that does not take a frame by then is closed


@dataclass(frozen=True)
class OpsConfig:
    endpoint: str = ""                # ZeroMQ ops socket; "" = ipc://<runtime.dir>/<instance>-ops.ipc
    metrics_host: str = "127.0.0.1"   # Prometheus /metrics listen address
    metrics_port: int = 9464          # 0 disables /metrics


@dataclass(frozen=True)
class RuntimeConfig:
    dir: Path = Path("/tmp/lipsync")  # ipc:// sockets live here
    instance: str = "default"         # names the ipc endpoints and shared-memory arenas
    arena_mb: int = 1024              # request arena in /dev/shm (visual + audio + UNet output)
    heartbeat_s: float = 0.5          # roles report liveness to the frontend this often
    start_timeout_s: float = 120.0    # every role must be ready by then
    restart_backoff_max_s: float = 30.0  # `lipsync serve` restarts a dead role after 0.5 s,
                                         # doubling up to this while it keeps dying


@dataclass(frozen=True)
class ModelConfig:
    model_id: str
    model_path: Path                  # the avatar's UNet ONNX
    background_dir: Path              # frame_0000.jpg ... (png/jpg/jpeg)
    crop_rects_path: Path             # JSON list of [x1, y1, x2, y2]
    num_frames: int                   # backgrounds loaded (frame 0 .. num_frames-1)
    source_video: Path | None = None  # frames are extracted from it when background_dir is empty
    preload_model: bool = False
    preload_backgrounds: bool = False
    preferred_gpu: int = -1           # -1: least-loaded device
    composite_mode: CompositeMode = "synctalk"


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

    def with_ports(self, grpc_port: int | None = None, ws_port: int | None = None) -> Config:
        """The same config with the command line's port overrides applied."""
        server = self.server
        if grpc_port is not None:
            server = dataclasses.replace(server, port=_port("--grpc-port", grpc_port))
        if ws_port is not None:
            server = dataclasses.replace(server, ws_port=_port("--ws-port", ws_port))
        return dataclasses.replace(self, server=server)


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate a config file; raise ConfigError naming the bad key."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    return parse_config(raw, base_dir=path.parent, path=path)


def parse_config(raw: Any, base_dir: Path, path: Path | None = None) -> Config:
    """Validate a parsed YAML mapping into a Config."""
    raw = _mapping("(top level)", raw)
    _known("(top level)", raw, {"server", "gpus", "batching", "capacity", "output", "compositor",
                                "runtime", "streaming", "ops", "models_root",
                                "audio_encoder_path", "models"})
    models_root = (base_dir / _str("models_root", raw.get("models_root", "models"))).resolve()
    server = _section(ServerConfig, "server", raw.get("server"), base_dir)
    gpus = _section(GpusConfig, "gpus", raw.get("gpus"), base_dir)
    batching = _section(BatchingConfig, "batching", raw.get("batching"), base_dir)
    capacity = _section(CapacityConfig, "capacity", raw.get("capacity"), base_dir)
    output = _section(OutputConfig, "output", raw.get("output"), base_dir)
    compositor = _section(CompositorConfig, "compositor", raw.get("compositor"), base_dir)
    runtime = _section(RuntimeConfig, "runtime", raw.get("runtime"), base_dir)
    streaming = _section(StreamingConfig, "streaming", raw.get("streaming"), base_dir)
    ops = _section(OpsConfig, "ops", raw.get("ops"), base_dir)
    _check("ops.endpoint", not ops.endpoint or ops.endpoint.startswith(("ipc://", "tcp://127.",
                                                                          "tcp://localhost:")),
           "must be ipc://PATH or tcp on loopback (tcp://127.0.0.1:PORT)")
    _check("ops.metrics_port", 0 <= ops.metrics_port <= 65535, "must be 0 (off) or a port")

    _check("server.port", 1 <= server.port <= 65535, "must be a port number 1-65535")
    _check("server.ws_port", 1 <= server.ws_port <= 65535, "must be a port number 1-65535")
    _check("server.max_message_size_mb", 1 <= server.max_message_size_mb <= 2047, "must be 1-2047")
    _check("server.request_timeout_s", server.request_timeout_s > 0, "must be > 0")
    _check("server.max_inflight_requests", server.max_inflight_requests >= 1, "must be >= 1")
    _check("server.shutdown_grace_s", 0 <= server.shutdown_grace_s <= 60, "must be 0-60")
    _check("server.drain_delay_s", 0 <= server.drain_delay_s <= 30, "must be 0-30")
    _check("gpus.count", 1 <= gpus.count <= 64, "must be 1-64")
    _check("gpus.provider", gpus.provider in ("auto", "cuda", "cpu"), "must be auto, cuda or cpu")
    _check("gpus.intra_op_threads", gpus.intra_op_threads >= 0, "must be >= 0")
    _check("batching.max_batch_frames", 0 <= batching.max_batch_frames <= 1024,
           "must be 0 (auto) or 1-1024")
    _check("batching.max_queue_delay_ms", 0 <= batching.max_queue_delay_ms <= 1000,
           "must be 0-1000")
    _check("capacity.max_models", capacity.max_models >= 1, "must be >= 1")
    _check("capacity.max_memory_gb", capacity.max_memory_gb > 0, "must be > 0")
    _check("capacity.idle_timeout_minutes", capacity.idle_timeout_minutes >= 0, "must be >= 0")
    _check("capacity.eviction_policy", capacity.eviction_policy == "lru",
           "must be lru (the only policy that uses real usage)")
    _check("output.jpeg_quality", 0 <= output.jpeg_quality <= 100, "must be 0-100")
    _check("compositor.pool_size", 1 <= compositor.pool_size <= 256, "must be 1-256")
    _check("runtime.instance", runtime.instance.replace("_", "").isalnum(),
           "must be letters, digits or _ (it is part of segment and socket names)")
    _check("runtime.arena_mb", runtime.arena_mb >= 64, "must be >= 64")
    _check("runtime.heartbeat_s", 0 < runtime.heartbeat_s <= 10, "must be in (0, 10]")
    _check("runtime.start_timeout_s", runtime.start_timeout_s > 0, "must be > 0")
    _check("runtime.restart_backoff_max_s", runtime.restart_backoff_max_s >= 0.5, "must be >= 0.5")

    _check("streaming.max_clients", streaming.max_clients >= 1, "must be >= 1")
    _check("streaming.batch_size", streaming.batch_size >= 1, "must be >= 1")
    _check("streaming.flush_timeout_s", streaming.flush_timeout_s > 0, "must be > 0")
    _check("streaming.max_message_bytes", streaming.max_message_bytes >= 1024, "must be >= 1024")
    _check("streaming.rate_limit_messages_per_s", streaming.rate_limit_messages_per_s > 0,
           "must be > 0")
    _check("streaming.send_timeout_s", streaming.send_timeout_s > 0, "must be > 0")

    models_raw = _mapping("models", raw.get("models") or {})
    models = {str(mid): _model(str(mid), spec, models_root) for mid, spec in models_raw.items()}
    for mid, model in models.items():
        _check(f"models.{mid}.preferred_gpu", -1 <= model.preferred_gpu < gpus.count,
               f"must be -1 or a GPU index below gpus.count ({gpus.count})")
    encoder = _path("audio_encoder_path", raw.get("audio_encoder_path", "audio_encoder.onnx"),
                    models_root)
    _check("streaming.default_model", not streaming.default_model
           or streaming.default_model in models, "must be one of the configured models")
    return Config(path=path, models_root=models_root, audio_encoder_path=encoder, server=server,
                  gpus=gpus, batching=batching, capacity=capacity, output=output,
                  compositor=compositor, runtime=runtime, streaming=streaming, ops=ops,
                  models=models)


_MODEL_KEYS = {"model_path", "background_dir", "crop_rects_path", "num_frames", "source_video",
               "preload_model", "preload_backgrounds", "preferred_gpu", "composite_mode"}


def _model(model_id: str, spec: Any, models_root: Path) -> ModelConfig:
    where = f"models.{model_id}"
    _check(where, bool(model_id.strip()), "model id must not be empty")
    spec = _mapping(where, spec)
    _known(where, spec, _MODEL_KEYS)
    for key in ("model_path", "background_dir", "crop_rects_path", "num_frames"):
        _check(f"{where}.{key}", key in spec, "is required")
    num_frames = _int(f"{where}.num_frames", spec["num_frames"])
    _check(f"{where}.num_frames", num_frames >= 1, "must be >= 1")
    mode = _str(f"{where}.composite_mode", spec.get("composite_mode", "synctalk"))
    _check(f"{where}.composite_mode", mode in ("synctalk", "stretch"), "must be synctalk or stretch")
    source = spec.get("source_video")
    return ModelConfig(
        model_id=model_id,
        model_path=_path(f"{where}.model_path", spec["model_path"], models_root),
        background_dir=_path(f"{where}.background_dir", spec["background_dir"], models_root),
        crop_rects_path=_path(f"{where}.crop_rects_path", spec["crop_rects_path"], models_root),
        num_frames=num_frames,
        source_video=_path(f"{where}.source_video", source, models_root) if source else None,
        preload_model=_bool(f"{where}.preload_model", spec.get("preload_model", False)),
        preload_backgrounds=_bool(f"{where}.preload_backgrounds",
                                  spec.get("preload_backgrounds", False)),
        preferred_gpu=_int(f"{where}.preferred_gpu", spec.get("preferred_gpu", -1)),
        composite_mode=mode,  # type: ignore[arg-type]
    )


def _section(cls: type, name: str, raw: Any, base_dir: Path) -> Any:
    """Build one flat section dataclass, coercing each key to its field's type."""
    raw = _mapping(name, raw if raw is not None else {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _known(name, raw, set(fields))
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{name}.{key}"
        default = fields[key].default
        if key == "port":
            values[key] = _port(where, value)
        elif isinstance(default, bool):
            values[key] = _bool(where, value)
        elif isinstance(default, int):
            values[key] = _int(where, value)
        elif isinstance(default, float):
            values[key] = _float(where, value)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
            values[key] = tuple(value)
        elif isinstance(default, Path):
            values[key] = (base_dir / _str(where, value)).resolve()
        elif default == "" and value == "":  # an optional string left empty
            values[key] = ""
        else:
            values[key] = _str(where, value)
    return cls(**values)


def _port(where: str, value: Any) -> int:
    """Accept 50053, "50053" and the Go listen form ":50053"."""
    if isinstance(value, str):
        value = value.rsplit(":", 1)[-1]
        if not value.isdigit():
            raise ConfigError(f"{where}: expected a port like 50053 or \":50053\"")
        value = int(value)
    port = _int(where, value)
    _check(where, 1 <= port <= 65535, "must be a port number 1-65535")
    return port


def _check(where: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _known(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _path(where: str, value: Any, root: Path) -> Path:
    return (root / _str(where, value)).resolve()


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value
