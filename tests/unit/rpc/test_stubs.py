"""The committed gRPC stubs: no drift from proto/, and the seed's wire contract kept."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from pipeline.rpc import generate, monolithic_pb2

STR, BYTES, I32, I64, F32, BOOL, MSG = (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_INT32, F.TYPE_INT64,
                                        F.TYPE_FLOAT, F.TYPE_BOOL, F.TYPE_MESSAGE)
REPEATED = True

# the seed's proto: message -> {field: (number, type, repeated)}
SEED_MESSAGES: dict[str, dict[str, tuple[int, int, bool]]] = {
    "CompositeBatchRequest": {
        "model_id": (1, STR, False), "visual_frames": (2, BYTES, False),
        "raw_audio": (3, BYTES, False), "audio_features": (4, BYTES, False),
        "batch_size": (5, I32, False), "start_frame_idx": (6, I32, False),
        "sample_rate": (7, I32, False),
    },
    "CompositeBatchResponse": {
        "composited_frames": (1, BYTES, REPEATED), "inference_time_ms": (2, F32, False),
        "composite_time_ms": (3, F32, False), "total_time_ms": (4, F32, False),
        "audio_processing_ms": (5, F32, False), "model_loaded": (6, BOOL, False),
        "model_load_time_ms": (7, F32, False), "success": (8, BOOL, False),
        "error": (9, STR, False), "gpu_id": (10, I32, False),
    },
    "ListModelsRequest": {},
    "ListModelsResponse": {"models": (1, MSG, REPEATED)},
    "ModelInfo": {
        "model_id": (1, STR, False), "loaded": (2, BOOL, False), "gpu_id": (3, I32, False),
        "memory_mb": (4, I64, False), "request_count": (5, I32, False),
        "avg_inference_ms": (6, F32, False),
    },
    "LoadModelRequest": {"model_id": (1, STR, False), "preferred_gpu": (2, I32, False)},
    "LoadModelResponse": {
        "success": (1, BOOL, False), "error": (2, STR, False), "gpu_id": (3, I32, False),
        "load_time_ms": (4, F32, False),
    },
    "UnloadModelRequest": {"model_id": (1, STR, False)},
    "UnloadModelResponse": {"success": (1, BOOL, False), "error": (2, STR, False)},
    "GetModelStatsRequest": {},
    "GetModelStatsResponse": {"models": (1, MSG, REPEATED)},
    "ModelStats": {
        "model_id": (1, STR, False), "loaded": (2, BOOL, False), "gpu_id": (3, I32, False),
        "memory_mb": (4, I64, False), "request_count": (5, I32, False),
        "total_inference_ms": (6, I64, False), "avg_inference_ms": (7, F32, False),
        "last_used_timestamp": (8, I64, False),
    },
    "HealthRequest": {},
    "HealthResponse": {
        "healthy": (1, BOOL, False), "loaded_models": (2, I32, False),
        "max_models": (3, I32, False), "gpu_ids": (4, I32, REPEATED),
        "gpu_memory_used_gb": (5, F32, REPEATED),
    },
}
NESTED = {("ListModelsResponse", "models"): "monolithic.ModelInfo",
          ("GetModelStatsResponse", "models"): "monolithic.ModelStats"}
SEED_RPCS = {
    "InferBatchComposite": ("CompositeBatchRequest", "CompositeBatchResponse"),
    "ListModels": ("ListModelsRequest", "ListModelsResponse"),
    "LoadModel": ("LoadModelRequest", "LoadModelResponse"),
    "UnloadModel": ("UnloadModelRequest", "UnloadModelResponse"),
    "GetModelStats": ("GetModelStatsRequest", "GetModelStatsResponse"),
    "Health": ("HealthRequest", "HealthResponse"),
}


def _repeated(field: F) -> bool:
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == F.LABEL_REPEATED


def test_committed_stubs_equal_a_fresh_regeneration(tmp_path: Path) -> None:
    """pipeline/rpc/*_pb2*.py are byte for byte what generate() writes from proto/ now."""
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == ["inference_pb2.py", "inference_pb2_grpc.py",
                                               "monolithic_pb2.py", "monolithic_pb2_grpc.py"]
    for fresh in written:
        committed = generate.STUB_DIR / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} differs from proto/: run `python -m pipeline.rpc.generate`")


def test_package_and_service() -> None:
    """The proto's package is `monolithic` with service MonolithicService."""
    assert monolithic_pb2.DESCRIPTOR.package == "monolithic"
    service = monolithic_pb2.DESCRIPTOR.services_by_name["MonolithicService"]
    assert service.full_name == "monolithic.MonolithicService"


def test_seed_rpcs_are_unary_with_seed_types() -> None:
    """The six seed RPCs exist, unary-unary, with the seed's request and response messages."""
    service = monolithic_pb2.DESCRIPTOR.services_by_name["MonolithicService"]
    methods = service.methods_by_name
    for name, (request, response) in SEED_RPCS.items():
        method = methods[name]
        assert method.input_type.full_name == f"monolithic.{request}", name
        assert method.output_type.full_name == f"monolithic.{response}", name
        assert not method.client_streaming and not method.server_streaming, name


@pytest.mark.parametrize("message", sorted(SEED_MESSAGES))
def test_seed_fields_unchanged(message: str) -> None:
    """Every seed field keeps its name, number, type and cardinality; added fields use new numbers."""
    descriptor = monolithic_pb2.DESCRIPTOR.message_types_by_name[message]
    seed = SEED_MESSAGES[message]
    for name, (number, ftype, repeated) in seed.items():
        field = descriptor.fields_by_number.get(number)
        assert field is not None, f"{message}: field number {number} ({name}) is gone"
        assert field.name == name, f"{message}.{number} is {field.name}, seed says {name}"
        assert field.type == ftype, f"{message}.{name}: type {field.type}, seed {ftype}"
        assert _repeated(field) == repeated, f"{message}.{name}: repeated changed"
        if ftype == MSG:
            assert field.message_type.full_name == NESTED[(message, name)]
    seed_numbers = {number for number, _, _ in seed.values()}
    for field in descriptor.fields:
        if field.number not in seed_numbers:
            assert field.name not in seed, f"{message}.{field.name} was renumbered"


def test_inference_service_keeps_the_seed_fields() -> None:
    """InferenceService/AudioRequest/AudioResponse: the seed's names and numbers, + frames = 5."""
    from pipeline.rpc import inference_pb2

    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert service.full_name == "InferenceService"
    assert [m.name for m in service.methods] == ["ProcessAudio"]
    fields = {m: {f.name: f.number for f in inference_pb2.DESCRIPTOR.message_types_by_name[m].fields}
              for m in ("AudioRequest", "AudioResponse")}
    assert fields["AudioRequest"] == {"client_id": 1, "audio_chunks": 2, "timestamp": 3}
    assert fields["AudioResponse"] == {"client_id": 1, "result": 2, "status_code": 3,
                                       "message": 4, "frames": 5}


def _gencode_version(stub: str) -> tuple[int, int, int]:
    text = (generate.STUB_DIR / stub).read_text()
    found = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                      r"\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert found, f"{stub}: no gencode version check"
    major, minor, patch = (int(g) for g in found.groups())
    return major, minor, patch


def test_protobuf_pin_admits_the_stubs_gencode_and_both_runtime_majors() -> None:
    """pyproject's protobuf pin starts no lower than the stubs' gencode (an older runtime refuses
    them) and admits 6.x (what pipecat-ai's protobuf<7 leaves) and 7.x alike."""
    from packaging.requirements import Requirement

    project = tomllib.loads((generate.PROTO_DIR.parent / "pyproject.toml").read_text())["project"]
    (pin,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "protobuf"]
    gencodes = {_gencode_version(s) for s in ("monolithic_pb2.py", "inference_pb2.py")}
    assert len(gencodes) == 1
    major, minor, patch = gencodes.pop()
    assert pin.specifier.contains(f"{major}.{minor}.{patch}")
    assert not pin.specifier.contains(f"{major}.{minor}.{patch - 1}" if patch
                                      else f"{major}.{minor - 1}.99")
    assert pin.specifier.contains("6.33.6") and pin.specifier.contains("7.36.2")
