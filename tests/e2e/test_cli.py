"""The `lipsync` command line as a user runs it (a real subprocess)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_config


def lipsync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path, models_root: Path) -> None:
    """`lipsync serve` with a bad value exits non-zero with a message naming the key."""
    config = write_config(tmp_path / "config.yaml", models_root, **{"output.jpeg_quality": 101})
    result = lipsync("serve", "--config", str(config), timeout=60)
    assert result.returncode != 0
    assert "output.jpeg_quality: must be 0-100" in result.stderr


def test_unknown_key_fails_at_start(tmp_path: Path, models_root: Path) -> None:
    """A misspelt key is refused, not ignored."""
    config = write_config(tmp_path / "config.yaml", models_root, **{"capacity.max_modles": 3})
    result = lipsync("serve", "--config", str(config), timeout=60)
    assert result.returncode != 0
    assert "capacity: unknown key 'max_modles'" in result.stderr


def test_compositor_device_gpu_without_cuda_fails_at_start_saying_why(
        tmp_path: Path, models_root: Path) -> None:
    """compositor.device gpu on a box whose workers cannot run CUDA: `lipsync serve` and the
    gpu-worker unit exit non-zero in one line that says why and what to set; no silent
    fallback to the CPU."""
    config = write_config(tmp_path / "config.yaml", models_root, **{"compositor.device": "gpu"})
    for command in ("serve", "role gpu-worker --index 0"):
        result = lipsync(*command.split(), "--config", str(config), timeout=60)
        assert result.returncode != 0, command
        assert result.stderr.count("\n") == 1, (command, result.stderr)
        assert "compositor.device is gpu, but the gpu_workers run on the cpu provider" in \
            result.stderr and "set compositor.device: cpu" in result.stderr, result.stderr


def test_every_command_with_a_config_answers_a_bad_one_in_one_line(tmp_path: Path) -> None:
    """Each command that takes --config, given a missing file, broken YAML, a misspelt key
    or a binary file, exits non-zero with one line naming the problem, no traceback (bench
    printed one, and started a server first for --stream)."""
    (tmp_path / "broken.yaml").write_text("server: [\n")
    (tmp_path / "misspelt.yaml").write_text("capacity:\n  max_modles: 3\n")
    cases = [("serve", "missing.yaml", "cannot read config"),
             ("demo-assets", "broken.yaml", "is not valid YAML"),
             ("bench", "misspelt.yaml", "unknown key 'max_modles'"),
             ("bench --stream", "missing.yaml", "cannot read config"),
             ("bench --stages", "broken.yaml", "is not valid YAML"),
             ("stats", "misspelt.yaml", "unknown key 'max_modles'"),
             ("role gpu-worker", sys.executable, "is not UTF-8 text")]
    for command, config, message in cases:
        result = lipsync(*command.split(), "--config", str(tmp_path / config), timeout=60)
        assert result.returncode != 0, command
        assert result.stderr.count("\n") == 1 and message in result.stderr, (command, result.stderr)


def test_demo_assets_command_builds_into_models_root(tmp_path: Path) -> None:
    """`lipsync demo-assets` writes the demo avatar where the config's models_root points."""
    root = tmp_path / "models"
    config = write_config(tmp_path / "config.yaml", root)
    first = lipsync("demo-assets", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert len(list((root / "demo" / "frames").glob("frame_*.jpg"))) == 250
    assert (root / "demo" / "unet.onnx").is_file() and (root / "audio_encoder.onnx").is_file()
    second = lipsync("demo-assets", "--config", str(config))
    assert second.returncode == 0 and "already present" in second.stdout
    assert not (root / "bench").exists()  # the bench model only on request
    bench = lipsync("demo-assets", "--config", str(config), "--bench-model")
    assert bench.returncode == 0, bench.stderr
    assert (root / "bench" / "unet.onnx").stat().st_size > 40e6  # 12.2 M float32 weights


def test_serve_leaves_a_config_without_the_demo_alone(tmp_path: Path, small_models_root: Path,
                                                     start_server) -> None:
    """`lipsync serve` of a config with only the user's avatar and the user's own
    models/audio_encoder.onnx (the default encoder path): the encoder is not overwritten,
    no demo/ appears, and the user's model serves."""
    import shutil

    import onnx

    from pipeline.client import build_request, channel
    from pipeline.rpc import monolithic_pb2_grpc as pb_grpc

    root = tmp_path / "models"
    shutil.copytree(small_models_root / "demo", root / "mine")
    encoder = onnx.load(small_models_root / "audio_encoder.onnx")
    encoder.doc_string = "the user's own encoder"
    onnx.save(encoder, root / "audio_encoder.onnx")
    mine = root / "audio_encoder.onnx"
    before = mine.read_bytes()
    server = start_server(models_root=root, models={"mine": {
        "model_path": "mine/unet.onnx", "background_dir": "mine/frames",
        "crop_rects_path": "mine/crop_rects.json", "num_frames": 32, "preload_model": True}})
    with channel(server.address) as ch:
        reply = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(
            build_request(server.config, "mine", 2, start=0), timeout=60)
    assert reply.success, reply.error
    assert mine.read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == ["audio_encoder.onnx", "mine"]


def test_demo_assets_names_a_foreign_file_in_one_line(tmp_path: Path) -> None:
    """`lipsync demo-assets` over a demo/ the server did not write stops with one line
    naming it, and the file stays."""
    root = tmp_path / "models"
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "unet.onnx").write_bytes(b"the user's own unet")
    config = write_config(tmp_path / "config.yaml", root)
    result = lipsync("demo-assets", "--config", str(config))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "lipsync did not write (unet.onnx)" in result.stderr
    assert (root / "demo" / "unet.onnx").read_bytes() == b"the user's own unet"


def test_an_installed_package_without_a_config_says_to_pass_one(tmp_path: Path) -> None:
    """A `pip install .` (not -e) puts the package where no config.yaml lies beside it: a
    command given no --config says in one line that none was found and what to pass, not
    "cannot read config .../site-packages/config.yaml"."""
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "pipeline", tmp_path / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for command in ("serve", "bench", "stats"):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", *command.split()],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode != 0, command
        assert result.stderr.count("\n") == 1, (command, result.stderr)
        assert "no config given" in result.stderr and "--config FILE" in result.stderr, \
            (command, result.stderr)
