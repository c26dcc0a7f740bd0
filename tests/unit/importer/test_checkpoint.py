"""Reading checkpoints without PyTorch: torch.save's zip and legacy formats and
.safetensors into numpy, and every pickle that names anything a state dict does not need
refused by name, with nothing in it run."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench import training_run as tr
from pipeline.bench.training_run import state_dict_pickle, write_torch_zip
from pipeline.importer.checkpoint import CheckpointError, read_state_dict

TENSORS = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
    "bn.running_var": np.array([0.5, 2.0], np.float32),
    "half.weight": np.array([1.5, -2.25, 65504.0], np.float16),
    "bn.num_batches_tracked": np.array(1234, np.int64),
}


def _assert_read(got: dict[str, np.ndarray]) -> None:
    assert list(got) == list(TENSORS)
    for key, want in TENSORS.items():
        expected_dtype = np.int64 if want.dtype == np.int64 else np.float32
        assert got[key].dtype == expected_dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want.astype(expected_dtype))


def _zip(path: Path, pickled: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


class _System:
    """Pickles as a call of os.system: what a hostile checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_a_torch_zip_is_read_into_numpy(tmp_path: Path) -> None:
    """float32, float16 (widened) and int64 tensors, a 0-d one included, keep their values,
    shapes and order."""
    _assert_read(read_state_dict(write_torch_zip(tmp_path / "200.pth", TENSORS)))


def test_a_strided_view_is_cut_from_its_storage(tmp_path: Path) -> None:
    """A tensor saved as a view (offset 1, shape [4, 2], strides [1, 4] into a storage of 12)
    reads as the view's values."""
    base = np.arange(12, dtype=np.float32)
    pickled = b"".join([
        b"\x80\x02", tr._global("collections", "OrderedDict"), b")R(", tr._text("t"),
        tr._global("torch._utils", "_rebuild_tensor_v2"), b"((", tr._text("storage"),
        tr._global("torch", "FloatStorage"), tr._text("0"), tr._text("cpu"), tr._int(12),
        b"tQ", tr._int(1), tr._tuple((4, 2)), tr._tuple((1, 4)), b"\x89",
        tr._global("collections", "OrderedDict"), b")RtRu."])
    got = read_state_dict(_zip(tmp_path / "v.pth", pickled, {"0": base.tobytes()}))["t"]
    np.testing.assert_array_equal(got, [[1, 5], [2, 6], [3, 7], [4, 8]])


def test_bfloat16_is_widened_to_float32(tmp_path: Path) -> None:
    """A BFloat16Storage (the upper half of float32) reads as the float32 values."""
    values = np.array([1.0, -2.5, 3.140625], np.float32)  # exact in bfloat16
    pickled = state_dict_pickle({"w": values}).replace(b"torch\nFloatStorage",
                                                        b"torch\nBFloat16Storage")
    upper = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    np.testing.assert_array_equal(read_state_dict(_zip(tmp_path / "b.pth", pickled,
                                                       {"0": upper}))["w"], values)


def test_the_legacy_format_is_read(tmp_path: Path) -> None:
    """PyTorch < 1.6's format: magic number, version, sys info, the state dict, the storage
    keys, then each storage's element count and bytes."""
    tensors = {k: np.asarray(v, order="C") for k, v in TENSORS.items()}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps({"little_endian": True}, protocol=2),
             state_dict_pickle(tensors, legacy=True),
             pickle.dumps([str(i) for i in range(len(tensors))], protocol=2)]
    parts += [struct.pack("<q", a.size) + a.tobytes() for a in tensors.values()]
    path = tmp_path / "old.pth"
    path.write_bytes(b"".join(parts))
    _assert_read(read_state_dict(path))


def test_safetensors_are_read(tmp_path: Path) -> None:
    """A .safetensors file reads through the safetensors package (floats as float32)."""
    from safetensors.numpy import save_file

    path = tmp_path / "unet.safetensors"
    save_file({k: np.asarray(v) for k, v in TENSORS.items()}, str(path))
    got = read_state_dict(path)
    _assert_read({k: got[k] for k in TENSORS})


def test_a_data_parallel_prefix_is_dropped(tmp_path: Path) -> None:
    """Keys saved from a DataParallel wrapper ("module.conv.weight") read as the model's."""
    path = write_torch_zip(tmp_path / "dp.pth", {f"module.{k}": v for k, v in TENSORS.items()})
    assert list(read_state_dict(path)) == list(TENSORS)


@pytest.mark.parametrize("container", ["zip", "raw"])
def test_a_pickle_that_would_run_a_command_runs_nothing(tmp_path: Path, container: str) -> None:
    """A checkpoint whose pickle calls os.system is refused, naming the call; the command
    never runs."""
    marker = tmp_path / "pwned"
    pickled = pickle.dumps(_System(f"touch {marker}"), protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        _zip(path, pickled)
    else:
        path.write_bytes(pickled)
    with pytest.raises(CheckpointError, match=r"refused posix\.system: a state dict holds only "
                                              r"tensors \(nothing in it was run\)"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(("pickled", "refused"), [
    (pickle.dumps({"w": eval}, protocol=2), "refused __builtin__.eval"),
    (b"\x80\x02cnumpy\nndarray\n)R.", "refused numpy.ndarray"),
    (b"\x80\x02(X\x04\x00\x00\x00evilX\x01\x00\x00\x000tQ.",
     "refused persistent id ('evil', '0'): not a tensor storage"),
    (state_dict_pickle({"w": np.zeros(2, np.float32)}).replace(b"tR", b"tR}b", 1),
     "refused: state set on a tensor"),
])
def test_anything_but_a_state_dict_is_refused_by_name(tmp_path: Path, pickled: bytes,
                                                       refused: str) -> None:
    """Globals outside the allow-list, foreign persistent ids and state set on a tensor are
    refused with one line saying what."""
    with pytest.raises(CheckpointError) as info:
        read_state_dict(_zip(tmp_path / "x.pth", pickled, {"0": bytes(8)}))
    assert refused in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    """A checkpoint cut short (a zip missing its end, a storage shorter than its tensors,
    a storage missing) is refused as such, naming the file."""
    whole = write_torch_zip(tmp_path / "200.pth", TENSORS).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=rf"{cut}: not a readable checkpoint \(truncated"):
        read_state_dict(cut)
    pickled = state_dict_pickle({"w": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="storage 0 holds 8 bytes, its tensors need 16"):
        read_state_dict(_zip(tmp_path / "short.pth", pickled, {"0": bytes(8)}))
    with pytest.raises(CheckpointError, match="storage 0 is missing from the archive"):
        read_state_dict(_zip(tmp_path / "none.pth", pickled))


@pytest.mark.parametrize(("content", "message"), [
    (b"not a checkpoint at all", "neither a torch.save zip"),
    (pickle.dumps([1, 2, 3], protocol=2), "not a torch checkpoint"),
])
def test_other_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    """A file that is no checkpoint says so in one line."""
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_a_pickle_of_something_else_is_not_a_state_dict(tmp_path: Path) -> None:
    """A zip whose pickle is a list, or a mapping to something else than tensors, is refused."""
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_state_dict(_zip(tmp_path / "l.pth", pickle.dumps([1], protocol=2)))
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int, not a tensor"):
        read_state_dict(_zip(tmp_path / "d.pth", pickle.dumps({"epoch": 3}, protocol=2)))
