"""Inter-process messages: every type round-trips through encode and its role's decoder."""
from __future__ import annotations

import msgspec
import pytest

from pipeline import messages as msg

REF = msg.TensorRef("lipsync-default-123-arena", 8192, (2, 3, 320, 320), "float32")

TO_WORKER = [
    msg.InferRequest(request_id=1, worker_pid=10, model_id="demo", batch_size=2, start_frame_idx=5,
                     output=REF, visual=REF),
    msg.InferRequest(request_id=2, worker_pid=10, model_id="demo", batch_size=1, start_frame_idx=0,
                     output=REF,
                     visual=msg.TensorRef("s", 0, (1, 6, 320, 320), "float32"),
                     audio=msg.TensorRef("s", 4096, (10240,), "float32"), sample_rate=44100,
                     features=msg.TensorRef("s", 0, (32, 16, 16), "float32")),
    msg.InferRequest(request_id=2, worker_pid=10, model_id="demo", batch_size=2, start_frame_idx=7,
                     output=REF, stream_offset=0,
                     background_indices=(248, 249)),
    msg.BackgroundJpegs(request_id=3, worker_pid=10, model_id="demo", indices=(0, 1, 2, 249)),
    msg.LoadModel(request_id=3, worker_pid=10, model_id="demo"),
    msg.UnloadModel(request_id=4, worker_pid=10, model_id="demo"),
]
TO_COMPOSITOR = [
    msg.CompositeJob(request_id=5, first_frame=0, predictions=None, backgrounds=(REF,),
                     rects=((0, 0, 1, 1),), mode="synctalk", jpeg_quality=75),
    msg.CompositeJob(request_id=5, first_frame=3, predictions=REF,
                     backgrounds=(msg.TensorRef("bg", 0, (720, 1280, 3), "uint8"),
                                  msg.TensorRef("bg", 2764800, (720, 1280, 3), "uint8")),
                     rects=((532, 210, 714, 392), (530, 211, 712, 393)), mode="synctalk",
                     jpeg_quality=75, live=True),
    msg.CompositeJob(request_id=6, first_frame=0, predictions=REF, backgrounds=(REF,),
                     rects=((0, 0, 1, 1),), mode="stretch", jpeg_quality=100),
    msg.ReleaseSegment(segment="lipsync-default-9-bg-demo"),
]
TO_FRONTEND = [
    msg.InferDone(request_id=7, gpu_id=0, queue_ns=5, audio_ns=1, encoder_ns=1, visual_ns=3,
                  inference_ns=2, composite_start_ns=4),
    msg.InferFailed(request_id=8, error="Inference failed: boom"),
    msg.FramesDone(request_id=9, first_frame=28, compositor=1, paste_ns=12345, jpeg_ns=6789),
    msg.FramesFailed(request_id=10, first_frame=2, error="failed to composite frame 3: x"),
    msg.ControlReply(request_id=11, ok=True),
    msg.ControlReply(request_id=12, ok=False, error="model 'x' not configured", gpu_id=1,
                     elapsed_ns=99),
    msg.Heartbeat(role="gpu_worker", index=0, pid=4242, gpu_id=0,
                  device_memory_used_bytes=10**9, loaded_models={"demo": 5 * 2**20, "other": 7},
                  queue_depth=3),
    msg.Heartbeat(role="compositor", index=2, pid=4343),
    msg.Heartbeat(role="gpu_worker", index=1, pid=4242, jobs_waiting=3, jobs_redispatched=2,
                  compositors=[msg.CompositorLink(0, 77, 2, 1, 40, True),
                               msg.CompositorLink(1, 78, 2, 2, 9, False)]),
    msg.RoleDown(role="gpu_worker", index=0, pid=4242, reason="ConfigMismatch: no"),
]
TO_WORKER_JOBS = [
    msg.Credit(index=1, pid=4343, credits=2),
    msg.Credit(index=1, pid=4343, credits=2, request_id=7, first_frame=4, cpu_ns=2_500_000),
    msg.RoleDown(role="compositor", index=1, pid=4343, reason="DecodeError: garbage"),
]
DECODERS = [(m, msg.worker_decoder) for m in TO_WORKER] + \
           [(m, msg.worker_jobs_decoder) for m in TO_WORKER_JOBS] + \
           [(m, msg.compositor_decoder) for m in TO_COMPOSITOR] + \
           [(m, msg.frontend_decoder) for m in TO_FRONTEND]


@pytest.mark.parametrize("message, decoder", DECODERS,
                         ids=[f"{type(m).__name__}{i}" for i, (m, _) in enumerate(DECODERS)])
def test_round_trip(message: msg.Message, decoder: msgspec.msgpack.Decoder) -> None:
    """encode() then the role's decoder gives back an equal message of the same type."""
    decoded = decoder.decode(msg.encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_every_message_type_is_covered() -> None:
    """Each member of the three unions has a round-trip case above."""
    unions = [msg.ToWorker, msg.ToWorkerJobs, msg.ToCompositor, msg.ToFrontend]
    members = {t for u in unions for t in u.__args__}
    assert members == {type(m) for m, _ in DECODERS}


def test_wrong_role_decoder_rejects() -> None:
    """A message sent to the wrong role fails to decode instead of being misread."""
    with pytest.raises(msgspec.ValidationError):
        msg.worker_decoder.decode(msg.encode(TO_FRONTEND[0]))
    with pytest.raises(msgspec.ValidationError):
        msg.frontend_decoder.decode(msg.encode(TO_COMPOSITOR[0]))
    with pytest.raises(msgspec.ValidationError):
        msg.compositor_decoder.decode(msg.encode(TO_WORKER[0]))


def test_a_negative_credit_does_not_decode() -> None:
    """A compositor cannot grant fewer than zero credits: such a Credit fails to decode."""
    with pytest.raises(msgspec.ValidationError):
        msg.worker_jobs_decoder.decode(msg.encode(msg.Credit(index=0, pid=1, credits=-1)))


def test_literal_fields_are_validated() -> None:
    """A composite mode outside synctalk/stretch does not decode."""
    bad = msg.CompositeJob(request_id=1, first_frame=0, predictions=REF, backgrounds=(REF,),
                           rects=((0, 0, 1, 1),), mode="blend", jpeg_quality=75)  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError):
        msg.compositor_decoder.decode(msg.encode(bad))


def test_defaults_survive_round_trip() -> None:
    """Omitted optional fields decode to their defaults."""
    decoded = msg.worker_decoder.decode(msg.encode(TO_WORKER[0]))
    assert msg.worker_decoder.decode(msg.encode(TO_WORKER[2])).visual is None  # built there
    assert decoded.audio is None and decoded.features is None
    assert decoded.sample_rate == 16000
    assert isinstance(decoded.output.shape, tuple)


@pytest.mark.parametrize("shape, dtype, nbytes", [
    ((2, 3, 320, 320), "float32", 2 * 3 * 320 * 320 * 4),
    ((720, 1280, 3), "uint8", 720 * 1280 * 3),
    ((10240,), "int16", 20480),
    ((4, 4), "float16", 32),
    ((), "float32", 4),
    ((0, 512), "float32", 0),
])
def test_tensor_ref_nbytes(shape: tuple[int, ...], dtype: str, nbytes: int) -> None:
    """TensorRef.nbytes is the product of the shape times the dtype's size."""
    assert msg.TensorRef("s", 0, shape, dtype).nbytes == nbytes
