"""Reading config.yaml into the typed Config: every key coerced to its field's type and
checked by its field's constraint, unknown keys refused, the environment's overrides
applied, paths resolved."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.environment import ENV_OVERRIDES
from pipeline.config.schema import DEFAULT_CONFIG_PATH, Config, ConfigError, ModelConfig, _check, _int, _port

MAX_CONFIG_BYTES = 2**20


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate a config file; raise ConfigError naming the bad key."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f:  # bounded: --config /dev/zero must not fill the memory
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
        raw = yaml.safe_load(data.decode()) or {}
    except FileNotFoundError as exc:
        if path == DEFAULT_CONFIG_PATH.resolve():  # the default, and no checkout around it
            raise ConfigError(
                f"no config given, and none at {path}, where a checkout installed with "
                f"`pip install -e .` keeps its own: pass --config FILE (the repository's "
                f"config.yaml is the template, systemd/config.yaml a service's)") from exc
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {_one_line(exc)}") from exc
    return parse_config(raw, base_dir=path.parent, path=path)


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with a caret under the spot) as one line."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(str(problem).split()) + where


_SECTIONS: dict[str, type] = {
    f.name: type(f.default_factory()) for f in dataclasses.fields(Config)
    if not isinstance(f.default_factory, dataclasses._MISSING_TYPE) and f.name != "models"}


def parse_config(raw: Any, base_dir: Path, path: Path | None = None) -> Config:
    """Validate a parsed YAML mapping into a Config (the environment overrides applied)."""
    raw = _mapping("(top level)", raw)
    _known("(top level)", raw, {*_SECTIONS, "models_root", "audio_encoder_path", "models"})
    models_root = (base_dir / _str("models_root", raw.get("models_root", "models"))).resolve()
    sections = {name: _section(cls, name, raw.get(name), base_dir)
                for name, cls in _SECTIONS.items()}
    for variable, (section, key, convert) in ENV_OVERRIDES.items():
        if variable in os.environ:
            try:
                value = convert(os.environ[variable])
            except ValueError as exc:
                raise ConfigError(f"{variable}: cannot read {os.environ[variable]!r}: {exc}") from None
            _validate(variable, fields_of(type(sections[section]))[key], value)
            sections[section] = dataclasses.replace(sections[section], **{key: value})
    server, streaming = sections["server"], sections["streaming"]
    _check("server.tls", (server.tls.cert_file is None) == (server.tls.key_file is None),
           "cert_file and key_file go together")
    _check("server.tls.client_ca_file", server.tls.client_ca_file is None or server.tls.enabled,
           "needs cert_file and key_file (mutual TLS is TLS first)")
    models_raw = _mapping("models", raw.get("models") or {})
    models = {str(mid): _model(str(mid), spec, models_root) for mid, spec in models_raw.items()}
    gpus = sections["gpus"].count
    for mid, model in models.items():
        _check(f"models.{mid}.preferred_gpu", -1 <= model.preferred_gpu < gpus,
               f"must be -1 or a GPU index below gpus.count ({gpus})")
    _check("streaming.default_model", not streaming.default_model
           or streaming.default_model in models, "must be one of the configured models")
    encoder = _path("audio_encoder_path", raw.get("audio_encoder_path", "audio_encoder.onnx"),
                    models_root)
    return Config(path=path, models_root=models_root, audio_encoder_path=encoder,
                  models=models, **sections)


def fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _model(model_id: str, spec: Any, models_root: Path) -> ModelConfig:
    where = f"models.{model_id}"
    _check(where, bool(model_id.strip()), "model id must not be empty")
    spec = _mapping(where, spec)
    _known(where, spec, set(fields_of(ModelConfig)) - {"model_id"})
    for key in ("model_path", "background_dir", "crop_rects_path", "num_frames"):
        _check(f"{where}.{key}", key in spec, "is required")
    return _section(ModelConfig, where, {"model_id": model_id, **spec}, models_root,
                    paths_under=models_root)


def _section(cls: type, name: str, raw: Any, base_dir: Path,
             paths_under: Path | None = None) -> Any:
    """Build one section dataclass, coercing each key to its field's type and checking its
    constraint (defaults included). Paths resolve against `paths_under` (models) or the
    config's directory."""
    raw = _mapping(name, raw if raw is not None else {})
    fields = fields_of(cls)
    _known(name, raw, set(fields))
    values: dict[str, Any] = {}
    for key, spec in fields.items():
        where = f"{name}.{key}"
        default: Any = None
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif not isinstance(spec.default_factory, dataclasses._MISSING_TYPE):
            default = spec.default_factory()
        if key not in raw:
            # a relative default path means what the same value in the file would
            values[key] = ((paths_under or base_dir) / default).resolve() \
                if isinstance(default, Path) and not default.is_absolute() else default
        else:
            values[key] = _coerce(where, raw[key], default, spec, paths_under or base_dir)
        _validate(where, spec, values[key])
    return cls(**values)


def _coerce(where: str, value: Any, default: Any, spec: dataclasses.Field[Any],
            root: Path) -> Any:
    if dataclasses.is_dataclass(default):
        return _section(type(default), where, value, root)
    if spec.metadata.get("path") or "Path" in str(spec.type):
        if value is None or value == "":
            return None if default is None else _str(where, value)
        return (root / _str(where, value)).resolve()
    if where.endswith("port"):
        return _port(where, value)
    if isinstance(default, bool) or spec.type == "bool":
        return _bool(where, value)
    if isinstance(default, int) or spec.type == "int":
        return _int(where, value)
    if isinstance(default, float):
        return _float(where, value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if default == "" and value == "":  # an optional string left empty
        return ""
    return _str(where, value)


def _validate(where: str, spec: dataclasses.Field[Any], value: Any) -> None:
    test = spec.metadata.get("test")
    if test is not None and value is not None and not test(value):
        raise ConfigError(f"{where}: {spec.metadata['message']}")






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




def _float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value
