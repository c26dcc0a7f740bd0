"""Importing a SyncTalk-2D training run (a synthetic one: the bench model's weights as a
torch.save checkpoint, demo frames, landmarks) in this process: the model folder it writes,
the model it builds, and every bad run refused in one line with nothing left behind."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.training_run import bench_unet_state_dict, write_torch_zip, write_training_run
from pipeline.cli import import_synctalk
from pipeline.demo.bench_model import build_bench_unet
from pipeline.demo.frames import demo_crop_rect
from pipeline.gpu_worker.unet import load_unet
from pipeline.importer.build import TOOL, import_training_run
from pipeline.importer.training_run import ImportFailed

FRAMES = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_run(tmp_path_factory.mktemp("run"), "may", FRAMES)


@pytest.fixture(scope="module")
def imported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "may"
    old = os.umask(0o022)
    try:
        import_training_run(run, "may", out)
    finally:
        os.umask(old)
    return out


def _variant(run: Path, dest: Path) -> Path:
    """A copy of `run` made of symlinks, for a test to replace one of its files."""
    for source in run.rglob("*"):
        if source.is_file():
            target = dest / source.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return dest


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lipsync")
    import_synctalk.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import-synctalk", *argv])
    return args.func(args)


def test_the_model_folder_holds_what_the_server_reads(run: Path, imported: Path) -> None:
    """unet.onnx, audio_encoder.onnx, the frames byte for byte under the loader's names,
    crop_rects.json, and the record with every source's sha256; readable by another user."""
    assert sorted(p.name for p in imported.iterdir()) == [
        "audio_encoder.onnx", "crop_rects.json", "frames", "import.json", "unet.onnx"]
    for i in range(FRAMES):
        assert (imported / "frames" / f"frame_{i:04d}.jpg").read_bytes() == \
            (run / "dataset" / "may" / "full_body_img" / f"{i}.jpg").read_bytes()
    record = json.loads((imported / "import.json").read_text())
    checkpoint = run / "checkpoint" / "may" / "1.pth"
    assert record["sources"]["checkpoint"] == {
        "path": str(checkpoint), "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert record["sources"]["frames"]["count"] == FRAMES and record["tool"] == TOOL
    assert record["outputs"]["unet.onnx"] == hashlib.sha256(
        (imported / "unet.onnx").read_bytes()).hexdigest()
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [imported, *imported.rglob("*")]}
    assert modes == {0o755, 0o644}
    assert not [p for p in imported.parent.iterdir() if p.name.startswith(".")]


def test_crop_rects_come_from_the_landmarks(imported: Path) -> None:
    """The landmarks of the synthetic run sit where the demo avatar's rects are: the rule
    gives those rects back."""
    rects = json.loads((imported / "crop_rects.json").read_text())
    assert rects == [list(demo_crop_rect(i)) for i in range(FRAMES)]


def test_the_unet_is_the_bench_model_it_was_saved_from(imported: Path, tmp_path: Path) -> None:
    """The checkpoint holds the bench model's weights: the imported UNet predicts what the
    bench model predicts."""
    bench = tmp_path / "bench.onnx"
    bench.write_bytes(build_bench_unet().SerializeToString())
    rng = np.random.default_rng(5)
    visual = rng.random((2, 6, 320, 320), dtype=np.float32)
    audio = rng.random((2, 32, 16, 16), dtype=np.float32)
    got, want = (np.empty((2, 3, 320, 320), np.float32) for _ in range(2))
    load_unet(imported / "unet.onnx", "cpu").run(visual, audio, got)
    load_unet(bench, "cpu").run(visual, audio, want)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_the_highest_epoch_is_imported(run: Path, tmp_path: Path) -> None:
    """Of 2.pth, 10.pth and 9.pth the 10th epoch is taken (by number), and --checkpoint
    overrides; an ONNX UNet is taken as it is."""
    variant = _variant(run, tmp_path / "run")
    folder = variant / "checkpoint" / "may"
    (folder / "1.pth").rename(folder / "10.pth")
    (folder / "2.pth").write_bytes(b"not a checkpoint")
    (folder / "9.pth").write_bytes(b"not a checkpoint")
    import_training_run(variant, "may", tmp_path / "a")
    onnx_unet = tmp_path / "unet.onnx"
    onnx_unet.write_bytes(build_bench_unet().SerializeToString())
    import_training_run(variant, "may", tmp_path / "b", checkpoint=onnx_unet)
    assert (tmp_path / "b" / "unet.onnx").read_bytes() == onnx_unet.read_bytes()
    with pytest.raises(ImportFailed, match=r"neither a torch\.save zip"):
        import_training_run(variant, "may", tmp_path / "c", checkpoint=folder / "9.pth")


def test_an_onnx_that_does_not_fit_the_server_is_refused(run: Path, tmp_path: Path) -> None:
    """An ONNX given as the UNet with other inputs, or with its batch fixed at 1 (an export
    without a dynamic axis), is refused saying what the server feeds; nothing is written."""
    from pipeline.demo.graphs import build_audio_encoder_model

    encoder = tmp_path / "encoder.onnx"
    encoder.write_bytes(build_audio_encoder_model().SerializeToString())
    with pytest.raises(ImportFailed, match=r"inputs \[\('mel_spectrogram', \('batch', 1, 80, "
                                           r"16\)\)\] and outputs .*; the server feeds"):
        import_training_run(run, "may", tmp_path / "a", checkpoint=encoder)
    fixed = build_bench_unet()
    for value in [*fixed.graph.input, *fixed.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    unet = tmp_path / "fixed.onnx"
    unet.write_bytes(fixed.SerializeToString())
    with pytest.raises(ImportFailed, match="'input' has its batch dimension fixed at 1"):
        import_training_run(run, "may", tmp_path / "b", checkpoint=unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "fixed.onnx"]


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def _hostile(path: Path) -> None:
    import zipfile

    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("1/data.pkl", pickle.dumps(_System(f"touch {path.parent}/pwned"),
                                                    protocol=2))


def _truncated(path: Path) -> None:
    _replace(path, path.read_bytes()[:1_000_000])


def _wenet(path: Path) -> None:
    tensors = bench_unet_state_dict()
    tensors["audio_model.conv1.conv.0.weight"] = np.zeros((512, 256, 1, 1), np.float32)
    path.unlink()
    write_torch_zip(path, tensors)


def _hubert(path: Path) -> None:
    (path.parents[2] / "dataset" / "may" / "aud_hu.npy").write_bytes(b"")


def _no_landmarks(path: Path) -> None:
    (path.parents[2] / "dataset" / "may" / "landmarks" / "3.lms").unlink()


def _gap(path: Path) -> None:
    (path.parents[2] / "dataset" / "may" / "full_body_img" / "2.jpg").unlink()


def _not_an_image(path: Path) -> None:
    _replace(path.parents[2] / "dataset" / "may" / "full_body_img" / "4.jpg", b"\xff\xd8 no")


@pytest.mark.parametrize(("spoil", "message"), [
    (_hostile, "refused posix.system: a state dict holds only tensors (nothing in it was run)"),
    (_truncated, "not a readable checkpoint (truncated or corrupt?)"),
    (_wenet, "a 'wenet' checkpoint (audio_model.conv1 takes 256 channels): only SyncTalk-2D "
             "unet_328 ('ave' audio mode) is served"),
    (_hubert, "a 'hubert' checkpoint (its dataset holds the 'hubert' features"),
    (_no_landmarks, "frame 3 has no landmarks"),
    (_gap, "frame 2 is missing from"),
    (_not_an_image, "frame 4: "),
])
def test_a_bad_run_is_refused_and_leaves_nothing(run: Path, tmp_path: Path, spoil,
                                                 message: str, capsys: pytest.CaptureFixture
                                                 ) -> None:
    """A hostile pickle, a truncated or wrong-architecture checkpoint, missing landmarks or
    frames: exit 2 with one line naming the problem; no model folder, no leftovers, the
    config untouched, nothing of the pickle run."""
    variant = _variant(run, tmp_path / "run")
    spoil(variant / "checkpoint" / "may" / "1.pth")
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"models_root: {models}\nmodels: {{}}\n")
    assert _cli(str(variant), "may", "--config", str(config),
                "--out", str(models / "new" / "may")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert list(models.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "config.yaml", "models", "run"]
    assert config.read_text() == f"models_root: {models}\nmodels: {{}}\n"
    assert not (variant / "checkpoint" / "may" / "pwned").exists()


def test_an_existing_folder_is_kept_unless_forced(run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A second import into the same folder is refused; --force replaces it whole."""
    out = tmp_path / "may"
    assert _cli(str(run), "may", "--out", str(out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _cli(str(run), "may", "--out", str(out)) == 2
    assert "already exists; --force replaces it" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert _cli(str(run), "may", "--out", str(out), "--force", "--smooth", "3") == 0
    assert json.loads((out / "import.json").read_text())["sources"]["landmarks"]["smooth"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["may"]
