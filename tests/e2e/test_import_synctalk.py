"""`lipsync import-synctalk` against SyncTalk-2D itself: the fixture's training run (random
weights) imported by the real command, its networks and crop rects equal to what
SyncTalk-2D's own inference computed, and the running server compositing its frames as
SyncTalk-2D did (within JPEG loss), by gRPC and over a WebSocket session."""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
import yaml
from websockets.asyncio.client import connect

from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel, parse_frame_message
from pipeline.config import load_config
from pipeline.gpu_worker import audio
from pipeline.gpu_worker import mel as mel_math
from pipeline.gpu_worker.sessions import AudioEncoder
from pipeline.gpu_worker.unet import load_unet
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.synctalk import visual_input
from tests.conftest import synctalk2d_run, write_config

MODEL, COPY = "synctalk", "synctalk_copy"


@pytest.fixture(scope="module")
def run() -> Path:
    return synctalk2d_run()


def reference(run: Path, name: str) -> np.ndarray:
    return np.load(run / "reference" / f"{name}.npy")


@pytest.fixture(scope="module")
def imported(run: Path, tmp_path_factory: pytest.TempPathFactory,
             small_models_root: Path) -> tuple[Path, dict]:
    """The fixture run imported by `lipsync import-synctalk` (a process of its own) into a
    folder, its entry added to a config: (the folder, the entry the command wrote)."""
    tmp = tmp_path_factory.mktemp("import")
    config = write_config(tmp / "config.yaml", small_models_root)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "import-synctalk", str(run), "demo", "--name",
         MODEL, "--out", str(tmp / MODEL), "--config", str(config)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported {MODEL}: 10 frames, 12.15 M parameters, "), \
        result.stdout
    assert load_config(config).models[MODEL].num_frames == 10
    return tmp / MODEL, yaml.safe_load(config.read_text())["models"][MODEL]


@pytest.fixture(scope="module")
def server(start_server, imported: tuple[Path, dict]) -> ServerProcess:
    """A server with the demo avatar, the imported one (preloaded), and a copy of it under
    another id for the re-import test."""
    folder, entry = imported
    shutil.copytree(folder, folder.parent / COPY)
    copy = {k: v.replace(f"/{MODEL}/", f"/{COPY}/") if isinstance(v, str) else v
            for k, v in entry.items()}
    return start_server(**{f"models.{MODEL}": {**entry, "preload_model": True},
                           f"models.{COPY}": copy})


def test_the_unet_predicts_what_synctalk2d_predicted(run: Path, imported: tuple[Path, dict]) -> None:
    """SyncTalk-2D's own visual input and features of frames 0..2 through the imported UNet
    give its prediction (max abs difference <= 2e-4)."""
    folder, _ = imported
    visual, features = reference(run, "img_concat"), reference(run, "audio_feat")[:3]
    prediction = np.empty((3, 3, 320, 320), np.float32)
    load_unet(folder / "unet.onnx", "cpu").run(visual, np.ascontiguousarray(features), prediction)
    assert np.abs(prediction - reference(run, "pred")).max() <= 2e-4


def test_the_audio_path_computes_synctalk2ds_features(run: Path,
                                                      imported: tuple[Path, dict]) -> None:
    """aud.wav's mel equals SyncTalk-2D's, and the imported encoder turns its windows into
    SyncTalk-2D's features (its first and last repeated at the ends, as it pads them)."""
    folder, _ = imported
    samples, rate = sf.read(run / "aud.wav", dtype="float32")
    mel = mel_math.melspectrogram(samples, rate)
    assert np.abs(mel - reference(run, "mel")).max() <= 1e-4
    encoded = AudioEncoder.create(folder / "audio_encoder.onnx", "cpu").encode(
        audio.mel_windows(mel))
    padded = np.concatenate([encoded[:1], encoded, encoded[-1:]])
    assert padded.shape == reference(run, "audio_feats").shape
    assert np.abs(padded - reference(run, "audio_feats")).max() <= 2e-4


def test_crop_rects_and_visual_input_are_synctalk2ds(run: Path,
                                                     imported: tuple[Path, dict]) -> None:
    """The crop rect of every frame SyncTalk-2D used equals its own, and the visual input
    built from the imported frames equals the one it fed its UNet."""
    folder, _ = imported
    rects = json.loads((folder / "crop_rects.json").read_text())
    used = reference(run, "img_index")
    assert [rects[i] for i in used] == reference(run, "crop_rects").tolist()
    for i, visual in enumerate(reference(run, "img_concat")):
        frame = cv2.imread(str(folder / "frames" / f"frame_{used[i]:04d}.jpg"))
        np.testing.assert_allclose(visual_input(frame, tuple(rects[used[i]])), visual, atol=1e-6)


def _frame(stub: pb_grpc.MonolithicServiceStub, model: str, start: int,
           features: np.ndarray) -> np.ndarray:
    """Frame `start` of `model` rendered with `features` ([32,16,16]), decoded."""
    response = stub.InferBatchComposite(pb.CompositeBatchRequest(
        model_id=model, batch_size=1, start_frame_idx=start,
        audio_features=features.astype("<f4").tobytes()), timeout=60)
    assert response.success, response.error
    return cv2.imdecode(np.frombuffer(response.composited_frames[0], np.uint8), cv2.IMREAD_COLOR)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_the_server_composites_synctalk2ds_frames(run: Path, imported: tuple[Path, dict],
                                                  server: ServerProcess) -> None:
    """InferBatchComposite, batch 1, start_frame_idx = the frame SyncTalk-2D used, its
    features, the visual input built by the server: every frame equals SyncTalk-2D's over
    the crop rect within JPEG loss (>= 35 dB), where the background alone is far off."""
    folder, _ = imported
    rects = json.loads((folder / "crop_rects.json").read_text())
    used, features = reference(run, "img_index"), reference(run, "audio_feat")
    with channel(server.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        for i, frame_index in enumerate(used.tolist()):
            got = _frame(stub, MODEL, frame_index, features[i])
            want = cv2.imread(str(run / "reference" / "frames" / f"{i}.png"))
            background = cv2.imread(str(folder / "frames" / f"frame_{frame_index:04d}.jpg"))
            x1, y1, x2, y2 = rects[frame_index]
            face = _psnr(got[y1:y2, x1:x2], want[y1:y2, x1:x2])
            assert face >= 35.0, f"frame {i}: {face:.1f} dB"
            assert _psnr(background[y1:y2, x1:x2], want[y1:y2, x1:x2]) < 30.0


def test_a_websocket_session_streams_the_imported_avatar(run: Path,
                                                         server: ServerProcess) -> None:
    """aud.wav streamed to /audio?model=synctalk: one frame per 40 ms, in order, each a
    640x360 picture of the imported avatar."""
    samples, _ = sf.read(run / "aud.wav", dtype="int16")
    pcm = samples.astype("<i2").tobytes()

    async def session() -> tuple[dict, dict[int, bytes], dict]:
        frames: dict[int, bytes] = {}
        async with connect(f"ws://127.0.0.1:{server.ws_port}/audio?model={MODEL}") as ws:
            ready = json.loads(await ws.recv())
            for i in range(0, len(pcm), 3200):
                await ws.send(pcm[i:i + 3200])
            await ws.send(json.dumps({"type": "flush"}))
            while True:
                message = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(message, str):
                    status = json.loads(message)
                    if status["type"] in ("flushed", "error"):
                        return ready, frames, status
                else:
                    frame = parse_frame_message(message)
                    frames[frame.index] = frame.jpeg

    ready, frames, status = asyncio.run(session())
    expected = math.ceil(len(samples) / 640)
    assert ready["model"] == MODEL and status == {"type": "flushed", "frames": expected}
    assert sorted(frames) == list(range(expected))
    shapes = {cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape
              for jpeg in frames.values()}
    assert shapes == {(360, 640, 3)}


def test_a_reimport_is_served_after_unload_and_load(run: Path, imported: tuple[Path, dict],
                                                     server: ServerProcess,
                                                     tmp_path: Path) -> None:
    """Importing another checkpoint over a served id (--force) changes nothing until the
    model is unloaded; LoadModel then serves the new weights (same paths, same frames)."""
    from pipeline.bench.training_run import bench_unet_state_dict, write_torch_zip

    folder, _ = imported
    features, frame = reference(run, "audio_feat")[0], int(reference(run, "img_index")[0])
    want = cv2.imread(str(run / "reference" / "frames" / "0.png"))
    x1, y1, x2, y2 = json.loads((folder / "crop_rects.json").read_text())[frame]
    with channel(server.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        before = _frame(stub, COPY, frame, features)
        checkpoint = write_torch_zip(tmp_path / "300.pth", bench_unet_state_dict())
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "import-synctalk", str(run), "demo",
             "--out", str(folder.parent / COPY), "--checkpoint", str(checkpoint), "--force"],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(_frame(stub, COPY, frame, features), before)
        assert stub.UnloadModel(pb.UnloadModelRequest(model_id=COPY), timeout=60).success
        assert stub.LoadModel(pb.LoadModelRequest(model_id=COPY), timeout=120).success
        after = _frame(stub, COPY, frame, features)
    assert _psnr(before[y1:y2, x1:x2], want[y1:y2, x1:x2]) >= 35.0
    assert _psnr(after[y1:y2, x1:x2], want[y1:y2, x1:x2]) < 30.0


def test_openvino_bf16_frames_within_40_db_on_the_imported_avatar(
        imported: tuple[Path, dict], small_models_root: Path, tmp_path: Path) -> None:
    """On the imported SyncTalk-2D avatar (its own audio encoder), OpenVINO f32 equals ONNX
    Runtime fp32 within 1e-4 and bf16's composited frames are >= 40 dB from fp32's."""
    ov_runtime = pytest.importorskip("pipeline.gpu_worker.openvino_runtime",
                                     reason="the openvino extra is not installed")
    from pipeline.bench.unet import precision_check

    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{f"models.{MODEL}": imported[1]})
    f32 = precision_check(config, MODEL, "cpu", 4, reference=("cpu", "fp32"),
                          candidate=("openvino", "fp32"))
    assert f32["prediction_max_abs_diff"] <= 1e-4, f32
    if not ov_runtime.bf16_units():
        pytest.skip("this CPU has no bf16 units: bf16 is never chosen here")
    bf16 = precision_check(config, MODEL, "cpu", 4, reference=("cpu", "fp32"),
                           candidate=("openvino", "bf16"))
    assert bf16["psnr_db_min"] >= 40.0, bf16
