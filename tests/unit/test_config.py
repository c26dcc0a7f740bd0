"""The typed config: loading, path resolution, and a validation error naming every bad key."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ModelConfig,
    load_config,
    parse_config,
)

MODEL = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
         "crop_rects_path": "demo/crop_rects.json", "num_frames": 10}


def _raw(**sections: Any) -> dict[str, Any]:
    """A minimal valid raw config with one model, plus the given top-level entries."""
    raw: dict[str, Any] = {"models_root": "models", "models": {"demo": dict(MODEL)}}
    raw.update(sections)
    return raw


def _parse(raw: dict[str, Any], base: Path = Path("/srv/lipsync")) -> Config:
    return parse_config(raw, base_dir=base)


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        _parse(raw)
    return str(info.value)


def _with_model(**changes: Any) -> dict[str, Any]:
    model = dict(MODEL)
    for key, value in changes.items():
        if value is _DELETE:
            model.pop(key)
        else:
            model[key] = value
    return _raw(models={"demo": model})


_DELETE = object()


# --- loading ------------------------------------------------------------------------------


def test_repo_config_loads() -> None:
    """The committed config.yaml loads with its Go-style port and the demo model under models/."""
    cfg = load_config(DEFAULT_CONFIG_PATH)
    repo = DEFAULT_CONFIG_PATH.parent
    assert cfg.path == DEFAULT_CONFIG_PATH
    assert cfg.server.port == 50053
    assert cfg.server.ws_port == 8080
    assert cfg.models_root == repo / "models"
    assert cfg.audio_encoder_path == repo / "models" / "audio_encoder.onnx"
    demo = cfg.models["demo"]
    assert demo.model_path == repo / "models" / "demo" / "unet.onnx"
    assert demo.num_frames == 250
    assert demo.composite_mode == "synctalk"
    assert demo.preferred_gpu == -1
    assert cfg.runtime.dir == repo / "run"
    assert cfg.jpeg_quality == 75


@pytest.mark.parametrize(("content", "message"), [
    (b"server: [\n", r"is not valid YAML: expected the node content, but found '<stream end>' "
                     r"at line 2, column 1$"),
    (b"\x7fELF\x02\x01\xd0\xd0", r"is not UTF-8 text \(byte 6\)$"),
    (b"#" * (2**20 + 1), r"is larger than 1 MiB$"),
])
def test_a_config_that_is_not_yaml_text_is_one_line(tmp_path: Path, content: bytes,
                                                   message: str) -> None:
    """Broken YAML, a binary file and an endless one each give a one-line ConfigError."""
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    """A config path that does not exist gives ConfigError naming the path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.yaml"):
        load_config(missing)


def test_invalid_yaml_is_config_error(tmp_path: Path) -> None:
    """A file that is not YAML gives ConfigError, not a yaml exception."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n  port: :50053\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config with every default and no models."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cfg = load_config(empty)
    assert cfg.models == {}
    assert cfg.server.port == 50053
    assert cfg.models_root == tmp_path / "models"


def test_top_level_not_a_mapping() -> None:
    """A YAML list at top level is rejected naming the top level."""
    with pytest.raises(ConfigError, match=r"^\(top level\): expected a mapping"):
        _parse([1, 2])  # type: ignore[arg-type]


# --- ports --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [":50053", "50053", 50053, "0.0.0.0:50053"])
def test_port_forms(value: object) -> None:
    """server.port accepts the Go listen form ":50053", a digit string and an int."""
    assert _parse(_raw(server={"port": value})).server.port == 50053


@pytest.mark.parametrize("value, message", [
    (0, "server.port: must be a port number 1-65535"),
    (65536, "server.port: must be a port number 1-65535"),
    (":0", "server.port: must be a port number 1-65535"),
    (":70000", "server.port: must be a port number 1-65535"),
    ("fifty", 'server.port: expected a port like 50053 or ":50053"'),
    (":", 'server.port: expected a port like 50053 or ":50053"'),
    ("-1", 'server.port: expected a port like 50053 or ":50053"'),
    (50053.0, "server.port: expected an integer"),
    (True, "server.port: expected an integer"),
])
def test_bad_port(value: object, message: str) -> None:
    """An out-of-range or malformed server.port is rejected naming server.port."""
    assert _error(_raw(server={"port": value})).startswith(message)


def test_ws_port_range() -> None:
    """server.ws_port out of range is rejected naming server.ws_port."""
    assert _error(_raw(server={"ws_port": 0})).startswith("server.ws_port:")


def test_with_ports_overrides() -> None:
    """with_ports replaces the given ports only and leaves the original config untouched."""
    cfg = _parse(_raw(server={"port": ":50053", "ws_port": 8080}))
    both = cfg.with_ports(grpc_port=6000, ws_port=6001)
    assert (both.server.port, both.server.ws_port) == (6000, 6001)
    grpc_only = cfg.with_ports(grpc_port=6000)
    assert (grpc_only.server.port, grpc_only.server.ws_port) == (6000, 8080)
    ws_only = cfg.with_ports(ws_port=6001)
    assert (ws_only.server.port, ws_only.server.ws_port) == (50053, 6001)
    assert cfg.with_ports() == cfg
    assert (cfg.server.port, cfg.server.ws_port) == (50053, 8080)
    assert both.models == cfg.models


def test_with_ports_validates() -> None:
    """A bad command-line port is a ConfigError naming the flag."""
    cfg = _parse(_raw())
    with pytest.raises(ConfigError, match=r"^--grpc-port: must be a port number"):
        cfg.with_ports(grpc_port=0)
    with pytest.raises(ConfigError, match=r"^--ws-port: must be a port number"):
        cfg.with_ports(ws_port=70000)


# --- paths --------------------------------------------------------------------------------


def test_a_model_may_name_its_own_audio_encoder() -> None:
    """models.<id>.audio_encoder_path resolves under models_root and is that model's
    encoder; a model without one runs with the shared audio_encoder_path."""
    raw = _raw(audio_encoder_path="shared.onnx")
    raw["models"]["own"] = {**MODEL, "audio_encoder_path": "own/audio_encoder.onnx"}
    cfg = _parse(raw)
    root = Path("/srv/lipsync/models")
    assert cfg.models["own"].audio_encoder_path == root / "own" / "audio_encoder.onnx"
    assert cfg.audio_encoder_of(cfg.models["own"]) == root / "own" / "audio_encoder.onnx"
    assert cfg.models["demo"].audio_encoder_path is None
    assert cfg.audio_encoder_of(cfg.models["demo"]) == root / "shared.onnx"


def test_relative_paths_join_once(tmp_path: Path) -> None:
    """models_root resolves against the config's directory, model paths against models_root, once."""
    path = tmp_path / "conf" / "config.yaml"
    path.parent.mkdir()
    raw = _raw(models_root="models", audio_encoder_path="enc/audio.onnx",
               runtime={"dir": "run"})
    raw["models"]["demo"]["source_video"] = "demo/video.mp4"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    root = tmp_path / "conf" / "models"
    assert cfg.models_root == root
    assert cfg.audio_encoder_path == root / "enc" / "audio.onnx"
    demo = cfg.models["demo"]
    assert demo.model_path == root / "demo" / "unet.onnx"
    assert demo.background_dir == root / "demo" / "frames"
    assert demo.crop_rects_path == root / "demo" / "crop_rects.json"
    assert demo.source_video == root / "demo" / "video.mp4"
    assert cfg.runtime.dir == tmp_path / "conf" / "run"
    assert "models/models" not in str(demo.model_path)


def test_a_config_without_runtime_dir_gets_the_documented_default(tmp_path: Path) -> None:
    """runtime.dir left out is `run` beside the config file, as the README's table and the
    shipped config.yaml say (the code's default was /tmp/lipsync)."""
    path = tmp_path / "conf" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"runtime": {"instance": "x"}}))
    assert load_config(path).runtime.dir == tmp_path / "conf" / "run"
    assert parse_config({}, base_dir=tmp_path).runtime.dir == tmp_path / "run"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    """Absolute models_root and model paths are used as given."""
    raw = _raw(models_root=str(tmp_path / "root"))
    raw["models"]["demo"]["model_path"] = str(tmp_path / "elsewhere" / "unet.onnx")
    cfg = _parse(raw)
    assert cfg.models_root == tmp_path / "root"
    assert cfg.models["demo"].model_path == tmp_path / "elsewhere" / "unet.onnx"
    assert cfg.models["demo"].background_dir == tmp_path / "root" / "demo" / "frames"


def test_model_defaults() -> None:
    """Optional model keys take their documented defaults."""
    demo = _parse(_raw()).models["demo"]
    assert isinstance(demo, ModelConfig)
    assert demo.model_id == "demo"
    assert demo.source_video is None
    assert (demo.preload_model, demo.preload_backgrounds) == (False, False)
    assert demo.preferred_gpu == -1
    assert demo.composite_mode == "synctalk"


# --- output -------------------------------------------------------------------------------


@pytest.mark.parametrize("configured, effective", [(0, 75), (90, 90), (1, 1), (100, 100)])
def test_jpeg_quality(configured: int, effective: int) -> None:
    """output.jpeg_quality 0 means 75 (as in the original); other values are used as given."""
    cfg = _parse(_raw(output={"jpeg_quality": configured}))
    assert cfg.output.jpeg_quality == configured
    assert cfg.jpeg_quality == effective


# --- validation: every error names its key -----------------------------------------------


@pytest.mark.parametrize("raw, message", [
    (_raw(bogus=1), "(top level): unknown key 'bogus'"),
    (_raw(server={"prot": 1}), "server: unknown key 'prot'"),
    (_raw(gpus={"cnt": 1}), "gpus: unknown key 'cnt'"),
    (_raw(runtime={"instnace": "x"}), "runtime: unknown key 'instnace'"),
    (_with_model(modle_path="x.onnx"), "models.demo: unknown key 'modle_path'"),
])
def test_unknown_keys(raw: dict[str, Any], message: str) -> None:
    """An unknown key at top level, in a section or in a model is named in the error."""
    assert _error(raw).startswith(message)


@pytest.mark.parametrize("raw, message", [
    (_raw(server=[1]), "server: expected a mapping, got list"),
    (_raw(models=["demo"]), "models: expected a mapping, got list"),
    (_raw(models={"demo": "unet.onnx"}), "models.demo: expected a mapping, got str"),
    (_raw(server={"host": 5}), "server.host: expected a non-empty string"),
    (_raw(server={"host": ""}), "server.host: expected a non-empty string"),
    (_raw(server={"request_timeout_s": "60"}), "server.request_timeout_s: expected a number"),
    (_raw(gpus={"count": "2"}), "gpus.count: expected an integer"),
    (_raw(gpus={"count": 1.5}), "gpus.count: expected an integer"),
    (_raw(gpus={"count": True}), "gpus.count: expected an integer"),
    (_raw(capacity={"max_memory_gb": True}), "capacity.max_memory_gb: expected a number"),
    (_raw(models_root=3), "models_root: expected a non-empty string"),
    (_raw(audio_encoder_path=None), "audio_encoder_path: expected a non-empty string"),
    (_with_model(num_frames="10"), "models.demo.num_frames: expected an integer"),
    (_with_model(preload_model="yes"), "models.demo.preload_model: expected true or false"),
    (_with_model(preload_backgrounds=1), "models.demo.preload_backgrounds: expected true or false"),
    (_with_model(preferred_gpu="0"), "models.demo.preferred_gpu: expected an integer"),
    (_with_model(model_path=7), "models.demo.model_path: expected a non-empty string"),
    (_with_model(composite_mode=1), "models.demo.composite_mode: expected a non-empty string"),
])
def test_wrong_types(raw: dict[str, Any], message: str) -> None:
    """A value of the wrong type is rejected naming its dotted key."""
    assert _error(raw).startswith(message)


@pytest.mark.parametrize("raw, message", [
    (_raw(output={"jpeg_quality": 101}), "output.jpeg_quality: must be 0-100"),
    (_raw(output={"jpeg_quality": -1}), "output.jpeg_quality: must be 0-100"),
    (_raw(gpus={"count": 0}), "gpus.count: must be 1-64"),
    (_raw(gpus={"count": 65}), "gpus.count: must be 1-64"),
    (_raw(gpus={"provider": "gpu"}), "gpus.provider: must be auto, cuda, cpu or openvino"),
    (_raw(gpus={"intra_op_threads": -1}), "gpus.intra_op_threads: must be >= 0"),
    (_raw(server={"max_message_size_mb": 0}), "server.max_message_size_mb: must be 1-2047"),
    (_raw(server={"request_timeout_s": 0}), "server.request_timeout_s: must be > 0"),
    (_raw(server={"max_inflight_requests": 0}), "server.max_inflight_requests: must be >= 1"),
    (_raw(capacity={"max_models": 0}), "capacity.max_models: must be >= 1"),
    (_raw(capacity={"eviction_policy": "lfu"}), "capacity.eviction_policy: must be lru"),
    (_raw(compositor={"pool_size": 0}), "compositor.pool_size: must be 1-256"),
    (_raw(runtime={"instance": "a-b"}), "runtime.instance: must be letters, digits or _"),
    (_raw(runtime={"instance": "a/b"}), "runtime.instance: must be letters, digits or _"),
    (_raw(runtime={"arena_mb": 63}), "runtime.arena_mb: must be >= 64"),
    (_raw(runtime={"heartbeat_s": 0}), "runtime.heartbeat_s: must be in (0, 10]"),
    (_with_model(num_frames=0), "models.demo.num_frames: must be >= 1"),
    (_with_model(composite_mode="blend"), "models.demo.composite_mode: must be synctalk or stretch"),
    (_with_model(preferred_gpu=1), "models.demo.preferred_gpu: must be -1 or a GPU index below "
                                   "gpus.count (1)"),
    (_with_model(preferred_gpu=-2), "models.demo.preferred_gpu: must be -1 or a GPU index"),
])
def test_out_of_range(raw: dict[str, Any], message: str) -> None:
    """An out-of-range value is rejected naming its dotted key and the allowed range."""
    assert _error(raw).startswith(message)


def test_preferred_gpu_follows_count() -> None:
    """preferred_gpu is checked against gpus.count: 1 is valid with two GPUs, 2 is not."""
    ok = _with_model(preferred_gpu=1)
    ok["gpus"] = {"count": 2}
    assert _parse(ok).models["demo"].preferred_gpu == 1
    bad = _with_model(preferred_gpu=2)
    bad["gpus"] = {"count": 2}
    assert _error(bad).startswith("models.demo.preferred_gpu: must be -1 or a GPU index below "
                                  "gpus.count (2)")


@pytest.mark.parametrize("key", ["model_path", "background_dir", "crop_rects_path", "num_frames"])
def test_required_model_keys(key: str) -> None:
    """Each required model key, when missing, is named in the error."""
    assert _error(_with_model(**{key: _DELETE})) == f"models.demo.{key}: is required"


def test_valid_values_pass() -> None:
    """The boundary values of each range are accepted."""
    raw = _raw(server={"port": 1, "ws_port": 65535}, gpus={"count": 64, "provider": "cpu"},
               output={"jpeg_quality": 100}, runtime={"instance": "a_1", "arena_mb": 64},
               compositor={"pool_size": 256})
    raw["models"]["demo"].update(composite_mode="stretch", preferred_gpu=63)
    cfg = _parse(raw)
    assert cfg.gpus.count == 64 and cfg.gpus.provider == "cpu"
    assert cfg.runtime.instance == "a_1"
    assert cfg.models["demo"].composite_mode == "stretch"


def test_config_is_frozen() -> None:
    """A loaded config cannot be mutated in place."""
    cfg = _parse(_raw())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_parse_does_not_mutate_raw() -> None:
    """Parsing leaves the caller's mapping unchanged."""
    raw = _raw(server={"port": ":50053"})
    before = copy.deepcopy(raw)
    _parse(raw)
    assert raw == before


def test_compositor_device() -> None:
    """compositor.device is cpu by default, gpu when asked, and nothing else."""
    assert _parse(_raw()).compositor.device == "cpu"
    assert _parse(_raw(compositor={"device": "gpu"})).compositor.device == "gpu"
    assert _error(_raw(compositor={"device": "cuda"})) == "compositor.device: must be cpu or gpu"


def test_unet_precision_and_cuda_graphs() -> None:
    """gpus.unet_precision is auto by default and one of auto/fp32/tf32/fp16/bf16;
    cuda_graphs a bool."""
    defaults = _parse(_raw()).gpus
    assert (defaults.unet_precision, defaults.cuda_graphs) == ("auto", False)
    for precision in ("auto", "fp32", "tf32", "fp16", "bf16"):
        gpus = _parse(_raw(gpus={"unet_precision": precision, "cuda_graphs": True})).gpus
        assert (gpus.unet_precision, gpus.cuda_graphs) == (precision, True)
    assert _error(_raw(gpus={"unet_precision": "fp8"})) == \
        "gpus.unet_precision: must be auto, fp32, tf32, fp16 or bf16"
    assert _error(_raw(gpus={"unet_precision": 16})).startswith(
        "gpus.unet_precision: expected a non-empty string")
    assert _error(_raw(gpus={"cuda_graphs": "yes"})).startswith(
        "gpus.cuda_graphs: expected true or false")


def test_the_seeds_environment_variables_override_their_keys(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_CLIENTS and FLUSH_TIMEOUT (Go durations) override their keys, checked by the
    keys' own constraints and named in the error; a retired BATCH_SIZE is reported."""
    from pipeline.config import retired_environment

    monkeypatch.setenv("MAX_CLIENTS", "7")
    monkeypatch.setenv("FLUSH_TIMEOUT", "500ms")
    cfg = parse_config({}, base_dir=tmp_path)
    assert (cfg.streaming.max_clients, cfg.streaming.flush_timeout_s) == (7, 0.5)
    monkeypatch.setenv("MAX_CLIENTS", "0")
    with pytest.raises(ConfigError, match=r"^MAX_CLIENTS: must be >= 1"):
        parse_config({}, base_dir=tmp_path)
    monkeypatch.setenv("MAX_CLIENTS", "many")
    with pytest.raises(ConfigError, match=r"^MAX_CLIENTS: cannot read 'many'"):
        parse_config({}, base_dir=tmp_path)
    assert retired_environment() == []
    monkeypatch.setenv("BATCH_SIZE", "10")
    assert [line.split(" ", 1)[0] for line in retired_environment()] == ["BATCH_SIZE"]
