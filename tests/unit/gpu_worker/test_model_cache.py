"""The gpu_worker's model cache in this process: a load measured, what heartbeats read,
an unload that gives memory back, and load outcomes as inbox items; no processes."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.gpu_worker import model_cache
from pipeline.gpu_worker.model_cache import LoadError, ModelCache, load_finished
from pipeline.shm.segment import SHM_DIR
from tests.conftest import SMALL_FRAMES, write_config
from tests.helpers import write_silent_encoder


def _demo_with(**fields: object) -> dict[str, object]:
    return {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
            "crop_rects_path": "demo/crop_rects.json", "num_frames": SMALL_FRAMES, **fields}


@pytest.fixture
def cache(tmp_path: Path, small_models_root: Path, instance: str):
    copy = tmp_path / "copy_of_the_shared_encoder.onnx"
    shutil.copyfile(small_models_root / "audio_encoder.onnx", copy)
    cfg = load_config(write_config(tmp_path / "config.yaml", small_models_root, **{
        "runtime.instance": instance, "gpus.intra_op_threads": 1,
        "models.nobg": _demo_with(background_dir="demo/none"),
        "models.copy": _demo_with(audio_encoder_path=str(copy)),
        "models.mute": _demo_with(audio_encoder_path=str(
            write_silent_encoder(tmp_path / "silent.onnx")))}))
    cache = ModelCache(cfg, 0, "cpu")
    yield cache
    cache.close()


def test_a_load_is_measured_and_reported_once_added(cache: ModelCache) -> None:
    """The load's memory is measured (at least its backgrounds); heartbeats see the model
    only once it is added, through a snapshot replaced whole."""
    model = cache.load(cache.cfg.models["demo"])
    assert model.memory_bytes >= model.avatar.nbytes > 0 and model.load_ns > 0
    assert model.avatar.num_frames == SMALL_FRAMES
    before = cache.loaded
    assert before == {} and cache.get("demo") is None
    cache.add(model)
    assert cache.loaded == {"demo": model.memory_bytes} and cache.loaded is not before
    assert cache.get("demo") is model


def test_unload_frees_the_backgrounds_and_the_heap(cache: ModelCache,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Unload closes the model, unlinks its backgrounds, hands freed heap back to the OS,
    and names the segment for the compositors; an unknown model gives None."""
    trims = []
    monkeypatch.setattr(model_cache, "release_free_heap", lambda: trims.append(1))
    cache.add(cache.load(cache.cfg.models["demo"]))
    segment = cache.models["demo"].avatar.segment.name
    assert (SHM_DIR / segment).exists()
    assert cache.unload("demo") == segment
    assert not (SHM_DIR / segment).exists() and cache.loaded == {} and trims == [1]
    assert cache.unload("demo") is None and trims == [1]


def test_two_loads_never_share_a_background_segment(cache: ModelCache) -> None:
    """Each load's backgrounds get a segment name of their own."""
    first = cache.load(cache.cfg.models["demo"])
    second = cache.load(cache.cfg.models["demo"])
    try:
        assert first.avatar.segment.name != second.avatar.segment.name
    finally:
        first.close()
        second.close()


def test_load_outcomes_become_inbox_items(cache: ModelCache,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A load's failure comes back as its client-facing reason: a LoadError's own text,
    any other error with its type."""
    missing = load_finished(cache, cache.cfg.models["nobg"])
    assert missing.model is None and missing.model_id == "nobg"
    assert missing.error.startswith("Failed to get model data: failed to load backgrounds")

    def broken(config: object) -> None:
        raise ValueError("no luck")

    monkeypatch.setattr(cache, "load", broken)
    assert load_finished(cache, cache.cfg.models["demo"]).error == "ValueError: no luck"
    monkeypatch.setattr(cache, "load", lambda config: (_ for _ in ()).throw(LoadError("plain")))
    assert load_finished(cache, cache.cfg.models["demo"]).error == "plain"


def test_each_distinct_audio_encoder_is_loaded_once_and_shared(cache: ModelCache) -> None:
    """Models of the shared encoder, or of a byte-identical copy of it, share one session; a
    model with an encoder of its own gets that one, given back when its last model goes
    (a failed load gives its back at once)."""
    shared, _ = cache.encoders.acquire(cache.cfg.audio_encoder_path)  # as Engine.create does
    demo, copy = cache.load(cache.cfg.models["demo"]), cache.load(cache.cfg.models["copy"])
    assert demo.encoder is shared and copy.encoder is shared
    cache.add(cache.load(cache.cfg.models["mute"]))
    mute = cache.models["mute"].encoder
    assert mute is not shared and len(cache.encoders.held) == 2
    assert not mute.encode(np.full((3, 1, 80, 16), 2.0, np.float32)).any()
    assert load_finished(cache, cache.cfg.models["nobg"]).model is None
    assert {users for _, users in cache.encoders.held.values()} == {3, 1}
    cache.unload("mute")
    demo.close()
    copy.close()
    assert [users for _, users in cache.encoders.held.values()] == [1]  # Engine.create's
