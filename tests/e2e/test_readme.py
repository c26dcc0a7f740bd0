"""The README's Python client, run as a user runs it: saved to a file in a directory of its
own, not the repository's, against a running server."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG_PATH, load_config
from pipeline.demo.assets import build_demo_assets

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_client_runs_from_any_directory(start_server, tmp_path: Path) -> None:
    """The README's client, its address pointed at a test server, run from a directory
    that is not the repository's: it saves the batch's 8 frames and prints their timings."""
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (client,) = [s for s in snippets if "build_request" in s]
    server = start_server()
    # the demo's files where the default config points (`lipsync serve` builds them there)
    build_demo_assets(load_config(DEFAULT_CONFIG_PATH).models_root)
    assert "localhost:50053" in client
    (tmp_path / "client.py").write_text(client.replace("localhost:50053", server.address))
    result = subprocess.run([sys.executable, "client.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("frame_*.jpg")) == [
        f"frame_{i:04d}.jpg" for i in range(8)]
    assert re.match(r"8 frames in \d+ ms", result.stdout), result.stdout
