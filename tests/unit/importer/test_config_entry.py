"""A model's entry written into a config file: comments and order kept, the result validated
before anything is written, an existing id refused unless forced, a backup kept."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.importer.config_entry import EntryError, ModelEntry, plan_entry

CONFIG = """\
# my server
models_root: models   # beside this file

models:
    demo:             # the built-in one
        model_path: demo/unet.onnx
        background_dir: demo/frames
        crop_rects_path: demo/crop_rects.json
        num_frames: 250

    # kept for benchmarks
    bench:
        model_path: bench/unet.onnx
        background_dir: demo/frames
        crop_rects_path: demo/crop_rects.json
        num_frames: 250

output:
  jpeg_quality: 80
"""


def _entry(model_id: str = "may", frames: int = 10) -> ModelEntry:
    return ModelEntry(model_id, {"model_path": f"{model_id}/unet.onnx",
                                 "audio_encoder_path": f"{model_id}/audio_encoder.onnx",
                                 "background_dir": f"{model_id}/frames",
                                 "crop_rects_path": f"{model_id}/crop_rects.json",
                                 "num_frames": frames, "preload_model": False,
                                 "composite_mode": "synctalk"})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    os.chmod(path, 0o640)
    return path


def test_an_entry_is_added_under_models_keeping_the_file(config: Path) -> None:
    """The entry lands after the last model, at the file's own indentation; every comment
    and the section after models: stay; the previous file is kept as a backup with its mode."""
    backup = plan_entry(config, _entry()).write()
    assert backup.read_text() == CONFIG and backup.name.startswith("config.yaml.")
    text = config.read_text()
    assert text.startswith(CONFIG.split("output:")[0].rstrip("\n") + "\n    may:\n")
    assert "# kept for benchmarks" in text and text.endswith("output:\n  jpeg_quality: 80\n")
    cfg = load_config(config)
    assert list(cfg.models) == ["demo", "bench", "may"] and cfg.output.jpeg_quality == 80
    may = cfg.models["may"]
    assert may.num_frames == 10 and may.preload_model is False
    assert may.audio_encoder_path == config.parent / "models" / "may" / "audio_encoder.onnx"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_an_existing_id_is_refused_unless_forced(config: Path) -> None:
    """The id of a model already there: refused (file untouched); with force the entry is
    replaced in place, the comment of the model after it kept."""
    with pytest.raises(EntryError, match=r"model 'demo' is already in .*; --force replaces it"):
        plan_entry(config, _entry("demo"))
    assert config.read_text() == CONFIG
    plan_entry(config, _entry("demo", frames=7), force=True).write()
    text = config.read_text()
    assert "# the built-in one" not in text and "    # kept for benchmarks\n    bench:" in text
    cfg = load_config(config)
    assert list(cfg.models) == ["demo", "bench"] and cfg.models["demo"].num_frames == 7


@pytest.mark.parametrize("text", ["models_root: models\n", "models: {}  # none yet\nout: 1\n"])
def test_a_config_without_models_gets_the_section(tmp_path: Path, text: str) -> None:
    """No models: section, or an empty one: the section then holds the entry."""
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("out: 1", "output: {jpeg_quality: 70}"))
    plan_entry(path, _entry()).write()
    assert list(yaml.safe_load(path.read_text())["models"]) == ["may"]


def test_an_entry_the_server_would_refuse_is_never_written(config: Path) -> None:
    """The edited config is validated as the server reads it; a bad result changes nothing."""
    bad = ModelEntry("may", {**_entry().fields, "num_frames": 0})
    with pytest.raises(EntryError, match=r"would not validate with the entry: "
                                         r"models\.may\.num_frames: must be >= 1"):
        plan_entry(config, bad)
    assert config.read_text() == CONFIG and len(list(config.parent.iterdir())) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("models: {demo: {model_path: a}}\n", "already in"),
    ("models: [1, 2]\n", "written inline; add the entry by hand"),
    ("models: {a: 1\n", "is not valid YAML"),
])
def test_configs_it_cannot_edit_say_so(tmp_path: Path, text: str, message: str) -> None:
    """Inline models, a clashing inline id or broken YAML: one line, the file untouched."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(EntryError, match=message):
        plan_entry(path, _entry("demo"))
    assert path.read_text() == text
