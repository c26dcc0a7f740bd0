"""The `lipsync` command line as a user runs it (a real subprocess)."""
from __future__ import annotations

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
