"""What a client of the server needs, in one module: a gRPC channel (TLS, token, limits),
the request builders (a SyncTalk-2D visual input from an avatar's own frames, speech-like
audio), the WebSocket options, and the streaming endpoints' messages (`pipeline.protocol`:
frame messages and status messages).

The README's example, `lipsync render`, `lipsync bench` and the tests all use these.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
from pathlib import Path

import cv2
import grpc
import numpy as np

from pipeline.config import client_credentials, load_config

# the stream's messages, defined with the server in pipeline.protocol; a client imports them here
from pipeline.protocol import (  # noqa: F401
    FrameMessage,
    StatusMessage,
    decode_status,
    frame_message,
    live_frame_message,
    parse_frame_message,
)
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.synctalk import FRAME_SAMPLES, SAMPLE_RATE, VISUAL_SHAPE, visual_input

MAX_MESSAGE = 256 * 2**20
MODEL_ID_HEADER = "x-model-id"

# UNAVAILABLE means "not processed, try again": a box that drains (SIGTERM) answers it until
# the balancer's readiness checks took it out of rotation (about a second). Attempts spaced
# ~0.2, 0.4, 0.8, 1.6 s (gRPC adds +-20 % jitter) outlast that, so a drain costs our clients
# nothing. RESOURCE_EXHAUSTED (overload) is not retried: that would add load to a full box.
# Other clients get the same by putting this in their channel's service config.
RETRY_SERVICE_CONFIG: dict[str, object] = {
    "methodConfig": [{
        "name": [{"service": "monolithic.MonolithicService"},
                 {"service": "InferenceService"},
                 {"service": "grpc.health.v1.Health"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


def channel_options(retries: bool = True) -> list[tuple[str, int | str]]:
    """Options of every channel of ours (grpc.aio channels take them too)."""
    if not retries:
        return [("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.enable_retries", 0)]
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
        # a request is retried only while gRPC still holds all of it: by default 256 KiB,
        # less than one frame of a client-built visual tensor
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE),
    ]


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call of a channel, and `x-model-id`
    (the balancer's affinity key): the request's model_id, else the channel's model (calls
    whose request carries none: pre-serialized bytes, streams naming it in a later message)."""

    def __init__(self, pairs: tuple[tuple[str, str], ...], model_id: str) -> None:
        self.pairs, self.model_id = pairs, model_id

    def _with(self, details: grpc.ClientCallDetails, request: object) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), *self.pairs]
        model = getattr(request, "model_id", None)
        model = model if isinstance(model, str) and model else self.model_id
        if model and all(key != MODEL_ID_HEADER for key, _ in metadata):
            metadata.append((MODEL_ID_HEADER, model))
        return details._replace(metadata=tuple(metadata))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details, request), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with(details, None), requests)

    intercept_stream_stream = intercept_stream_unary


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--token and --tls-ca for a command that talks to a server (they set the environment
    the clients read, so every channel and WebSocket of the command uses them)."""
    parser.add_argument("--token", help="bearer token for a server with server.auth "
                                        "(default: $LIPSYNC_TOKEN)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate of a TLS server "
                                                        "(default: $LIPSYNC_TLS_CA)")


def apply_security_arguments(args: argparse.Namespace) -> None:
    if getattr(args, "token", None):
        os.environ["LIPSYNC_TOKEN"] = args.token
    if getattr(args, "tls_ca", None):
        os.environ["LIPSYNC_TLS_CA"] = str(args.tls_ca)


def websocket_options() -> dict[str, object]:
    """What a WebSocket client of ours passes to connect(): the token as an Authorization
    header and, for wss://, the CA ($LIPSYNC_TOKEN, $LIPSYNC_TLS_CA)."""
    options: dict[str, object] = {}
    token, ca = client_credentials()
    if token:
        options["additional_headers"] = {"Authorization": f"Bearer {token}"}
    if ca:
        options["ssl"] = ssl.create_default_context(cafile=ca)
    return options


def channel(address: str, model_id: str = "", *, token: str | None = None,
            tls_ca: str | os.PathLike[str] | None = None,
            client_cert: tuple[Path, Path] | None = None, retries: bool = True) -> grpc.Channel:
    """A channel to the server (or the balancer) at `address`, retrying UNAVAILABLE (unless
    `retries` is False: a caller that wants to see each failure as it is), whose
    calls carry `x-model-id` (the request's model_id, else `model_id`; empty: none). `token`
    (default $LIPSYNC_TOKEN) goes with every call as `authorization: Bearer`; `tls_ca`
    (default $LIPSYNC_TLS_CA), a PEM file of the CA that signed the server's certificate,
    makes it a TLS channel, presenting `client_cert` (certificate, key) to a server that
    asks for one (mutual TLS)."""
    env_token, env_ca = client_credentials()
    token = token if token is not None else env_token
    tls_ca = tls_ca if tls_ca is not None else env_ca
    options = channel_options(retries)
    if tls_ca:
        ca = Path(tls_ca).read_bytes()
        cert, key = (client_cert[0].read_bytes(), client_cert[1].read_bytes()) \
            if client_cert else (None, None)
        credentials = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
        ch = grpc.secure_channel(address, credentials, options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    pairs = (("authorization", f"Bearer {token}"),) if token else ()
    return grpc.intercept_channel(ch, _Metadata(pairs, model_id))


def speech_like_audio(seconds: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Voiced bursts with pauses: a pitch harmonic series under a 3 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 2
    return (0.3 * envelope * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def build_request(cfg_path: Path, model_id: str, batch: int, start: int,
                  client_visual: bool = True) -> pb.CompositeBatchRequest:
    """A request as a SyncTalk-2D client sends it; with client_visual False, audio only
    (empty visual_frames: the server builds the visual input from the avatar's frames)."""
    audio = speech_like_audio((batch + 15) * FRAME_SAMPLES / SAMPLE_RATE)
    request = pb.CompositeBatchRequest(model_id=model_id, raw_audio=audio.tobytes(),
                                       batch_size=batch, start_frame_idx=start,
                                       sample_rate=SAMPLE_RATE)
    if not client_visual:
        return request
    from pipeline.gpu_worker.avatar import find_frame, load_crop_rects  # the avatar's files

    cfg = load_config(cfg_path)
    model = cfg.models[model_id]
    rects = load_crop_rects(model.crop_rects_path)
    names = {p.name for p in model.background_dir.iterdir()}
    visual = np.empty((batch, *VISUAL_SHAPE), np.float32)
    for i in range(batch):
        idx = (start + i) % model.num_frames
        frame = cv2.imread(str(find_frame(model.background_dir, idx, names)))
        if frame is None:
            raise ValueError(f"cannot read background frame {idx} of {model_id}")
        x1, y1, x2, y2 = (int(v) for v in rects[idx])
        visual_input(frame, (x1, y1, x2, y2), out=visual[i])
    request.visual_frames = visual.tobytes()
    return request


