"""What `lipsync serve` and `lipsync demo-assets` build: the demo's files only for a config
that serves the demo, never over a file the server did not write, readable as the umask
allows."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import parse_config
from pipeline.demo.assets import DemoAssetsError, build_demo_assets
from pipeline.demo.ensure import ensure_demo_assets

FRAMES = 4
DEMO = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
        "crop_rects_path": "demo/crop_rects.json", "num_frames": FRAMES}
MINE = {"model_path": "mine/unet.onnx", "background_dir": "mine/frames",
        "crop_rects_path": "mine/crop_rects.json", "num_frames": FRAMES}


def _config(root: Path, **models: dict[str, object]):
    return parse_config({"models_root": str(root), "models": models}, root)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_config_without_the_demo_writes_nothing(tmp_path: Path) -> None:
    """A config serving only the user's own avatar, with the default encoder path: the
    user's audio_encoder.onnx stays as it is and no demo/ appears."""
    (tmp_path / "audio_encoder.onnx").write_bytes(b"the user's own encoder")
    before = _tree(tmp_path)
    assert ensure_demo_assets(_config(tmp_path, mine=MINE)) is False
    assert _tree(tmp_path) == before
    assert not (tmp_path / "demo").exists()


def test_the_demo_is_built_beside_a_foreign_encoder_it_keeps(tmp_path: Path) -> None:
    """A config serving the demo gets the demo avatar built, but an audio_encoder.onnx the
    server did not write is kept, byte for byte."""
    (tmp_path / "audio_encoder.onnx").write_bytes(b"the user's own encoder")
    assert ensure_demo_assets(_config(tmp_path, demo=DEMO)) is True
    assert (tmp_path / "audio_encoder.onnx").read_bytes() == b"the user's own encoder"
    assert (tmp_path / "demo" / "unet.onnx").is_file()
    assert ensure_demo_assets(_config(tmp_path, demo=DEMO)) is False  # complete: no rebuild
    assert ensure_demo_assets(_config(tmp_path, demo=DEMO), force=True) is True
    assert (tmp_path / "audio_encoder.onnx").read_bytes() == b"the user's own encoder"


def test_a_foreign_demo_directory_stops_the_build(tmp_path: Path) -> None:
    """A demo/ the server did not write (here: the user's own UNet under that name) is not
    replaced: the build stops with an error naming it, and every file stays."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "unet.onnx").write_bytes(b"the user's own unet")
    before = _tree(tmp_path)
    with pytest.raises(DemoAssetsError, match=r"demo.* lipsync did not write.*unet\.onnx"):
        ensure_demo_assets(_config(tmp_path, demo=DEMO))
    assert _tree(tmp_path) == before


def test_a_file_added_to_the_built_demo_stops_a_rebuild(tmp_path: Path) -> None:
    """A file the user put into a demo/ the server built is not deleted by --force."""
    build_demo_assets(tmp_path, num_frames=FRAMES)
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    with pytest.raises(DemoAssetsError, match=r"notes\.txt"):
        ensure_demo_assets(_config(tmp_path, demo=DEMO), force=True)
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine"


def test_a_changed_file_of_the_built_demo_stops_a_rebuild(tmp_path: Path) -> None:
    """A built file the user overwrote (its hash no longer the one recorded) is theirs now."""
    paths = build_demo_assets(tmp_path, num_frames=FRAMES)
    paths.unet_path.write_bytes(b"retrained by the user")
    with pytest.raises(DemoAssetsError, match=r"unet\.onnx"):
        build_demo_assets(tmp_path, num_frames=FRAMES, force=True)
    assert paths.unet_path.read_bytes() == b"retrained by the user"


def test_what_the_server_built_is_rebuilt(tmp_path: Path) -> None:
    """Its own files are the server's to replace: --force, another frame count and an
    older asset version all rebuild over them (the encoder included)."""
    paths = build_demo_assets(tmp_path, num_frames=FRAMES)
    manifest = paths.unet_path.parent / "build.json"
    recorded = json.loads(manifest.read_text())
    assert set(recorded["files"]) >= {"unet.onnx", "crop_rects.json", "frames/frame_0000.jpg"}
    assert set(recorded["shared"]) == {"audio_encoder.onnx"}
    encoder_mtime = paths.audio_encoder_path.stat().st_mtime_ns
    assert ensure_demo_assets(_config(tmp_path, demo=DEMO), force=True) is True
    assert paths.audio_encoder_path.stat().st_mtime_ns != encoder_mtime
    assert ensure_demo_assets(_config(tmp_path, demo={**DEMO, "num_frames": FRAMES + 2})) is True
    assert (paths.background_dir / f"frame_{FRAMES + 1:04d}.jpg").is_file()
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 0}))
    assert ensure_demo_assets(_config(tmp_path, demo={**DEMO, "num_frames": FRAMES + 2})) is True


def test_a_build_from_before_hashes_were_recorded_is_the_servers(tmp_path: Path) -> None:
    """A demo/ with the old build.json (version and frame count, no hashes) and the encoder
    the generator writes are recognised as the server's, and rebuilt."""
    paths = build_demo_assets(tmp_path, num_frames=FRAMES)
    manifest = paths.unet_path.parent / "build.json"
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"version": old["version"], "num_frames": FRAMES}))
    assert ensure_demo_assets(_config(tmp_path, demo=DEMO), force=True) is True


def test_an_encoder_elsewhere_leaves_the_default_place_empty(tmp_path: Path) -> None:
    """A config serving the demo avatar with its own encoder elsewhere gets no
    audio_encoder.onnx written at the default place."""
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "real.onnx").write_bytes(b"a real encoder")
    cfg = parse_config({"models_root": str(tmp_path), "audio_encoder_path": "enc/real.onnx",
                        "models": {"demo": DEMO}}, tmp_path)
    assert ensure_demo_assets(cfg) is True
    assert not (tmp_path / "audio_encoder.onnx").exists()
    assert (tmp_path / "demo" / "unet.onnx").is_file()


@pytest.mark.parametrize(("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask-022", "umask-027"])
def test_built_files_are_readable_as_the_umask_allows(tmp_path: Path, umask: int, dirs: int,
                                                      files: int) -> None:
    """demo/, demo/frames and every file get the modes the umask gives (root builds, the
    service user serves), not a temporary directory's 0700."""
    old = os.umask(umask)
    try:
        paths = build_demo_assets(tmp_path / "models", num_frames=FRAMES)
    finally:
        os.umask(old)
    model_dir = paths.unet_path.parent
    assert {d.stat().st_mode & 0o777 for d in (model_dir, paths.background_dir)} == {dirs}
    written = [p for p in model_dir.rglob("*") if p.is_file()] + [paths.audio_encoder_path]
    assert {p.stat().st_mode & 0o777 for p in written} == {files}



def test_a_foreign_bench_model_is_not_replaced(tmp_path: Path) -> None:
    """`demo-assets --force --bench-model` replaces the bench UNet it wrote, but not a file
    of that name the server did not write."""
    build_demo_assets(tmp_path, num_frames=FRAMES)
    cfg = _config(tmp_path, demo=DEMO, bench={**DEMO, "model_path": "bench/unet.onnx"})
    assert ensure_demo_assets(cfg, bench_model=True) is True
    bench = tmp_path / "bench" / "unet.onnx"
    mtime = bench.stat().st_mtime_ns
    assert ensure_demo_assets(cfg, force=True, bench_model=True) is True
    assert bench.stat().st_mtime_ns != mtime
    bench.write_bytes(b"the user's own bench model")
    with pytest.raises(DemoAssetsError, match=r"bench/unet\.onnx was not written by lipsync"):
        ensure_demo_assets(cfg, force=True, bench_model=True)
    assert bench.read_bytes() == b"the user's own bench model"
