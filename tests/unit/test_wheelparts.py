"""scripts/wheelparts.py: wheels split into parts, the sha256 manifest, reassembly that names
every missing or corrupt file, the carry plan, and the pip check for the box's Python."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import wheelparts


def test_split_then_reassemble_gives_the_same_wheels(tmp_path: Path, wheels: list[Path]) -> None:
    """Wheels over the part size travel as ordered parts, the rest whole; reassembly from
    several folders (calls) restores every byte."""
    parts = tmp_path / "parts"
    manifest = wheelparts.split_wheels(wheels, parts, part_bytes=4000)
    big = next(w for w in manifest["wheels"] if w["name"].startswith("bigpkg"))
    small = next(w for w in manifest["wheels"] if w["name"].startswith("smallpkg"))
    assert len(big["parts"]) >= 3 and small["parts"] == []
    assert all(p["size"] <= 4000 for p in big["parts"])
    # spread over two "calls", the manifest in each
    calls = [tmp_path / "call1", tmp_path / "call2"]
    for i, f in enumerate(sorted(parts.iterdir())):
        folder = calls[i % 2]
        folder.mkdir(exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    (calls[1] / wheelparts.MANIFEST).write_bytes((parts / wheelparts.MANIFEST).read_bytes())
    out = wheelparts.reassemble([tmp_path / "call1", tmp_path / "call2"], tmp_path / "whole")
    assert sorted(p.name for p in out) == sorted(w.name for w in wheels)
    for wheel in wheels:
        assert (tmp_path / "whole" / wheel.name).read_bytes() == wheel.read_bytes()


def test_reassembly_names_every_missing_and_corrupt_part(tmp_path: Path,
                                                        wheels: list[Path]) -> None:
    """A lost part and a damaged part are both named in one error, nothing half-written kept."""
    parts = tmp_path / "parts"
    manifest = wheelparts.split_wheels(wheels, parts, part_bytes=4000)
    names = [p["name"] for p in manifest["wheels"][0]["parts"]]
    (parts / names[0]).unlink()
    damaged = parts / names[1]
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])
    with pytest.raises(wheelparts.WheelError) as info:
        wheelparts.reassemble([parts], tmp_path / "whole")
    assert f"missing {names[0]}" in str(info.value)
    assert f"corrupt {names[1]}" in str(info.value)


def test_carry_plan_fills_calls_within_capacity() -> None:
    """Files are packed into as few calls as fit, none over the capacity; a file larger than
    one call is refused."""
    files = [("a.part00", 55), ("a.part01", 55), ("a.part02", 20), ("b.whl", 8), ("c.whl", 1)]
    calls = wheelparts.carry_plan(files, capacity=64)
    assert [c.index for c in calls] == [1, 2, 3]
    assert all(c.size <= 64 for c in calls)
    assert sorted(n for c in calls for n, _ in c.files) == sorted(n for n, _ in files)
    with pytest.raises(wheelparts.WheelError, match="exceeds one call"):
        wheelparts.carry_plan([("huge", 65)], capacity=64)
