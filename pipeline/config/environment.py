"""The one place the environment is read: the seed's variables that override config keys
(checked by the keys' own constraints when the config is loaded), the retired ones, and
what our clients and logs take from it."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def parse_duration(text: str) -> float:
    """Go-style durations as the seed takes them: "2s", "500ms", "1.5s", "1m"; bare seconds."""
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


# the seed's variables that override a config key (checked by the key's own constraint)
ENV_OVERRIDES: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "MAX_CLIENTS": ("streaming", "max_clients", int),
    "FLUSH_TIMEOUT": ("streaming", "flush_timeout_s", parse_duration),
}
# the seed's variables that no longer mean anything, and why
ENV_RETIRED = {
    "BATCH_SIZE": "frames are rendered as soon as the audio they need has arrived; the seed "
                  "gathered BATCH_SIZE messages first, which only added latency",
}


def env_flag(name: str) -> bool:
    """A yes/no variable (LIPSYNC_LOG_JSON=1: JSON log lines)."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def gpu_path_on_cpu() -> bool:
    """LIPSYNC_GPU_TESTS_ON_CPU=1 (`scripts/gpu-suite --dry-run`): the GPU-only paths run on
    the CPU instead (the GPU tests on the CPU provider; `compositor.device: gpu` on ONNX
    Runtime's CPU provider and nvImageCodec's CPU encoder): a test of those paths, never a
    fallback a deployment gets."""
    return env_flag("LIPSYNC_GPU_TESTS_ON_CPU")


def grpc_server_address(default: str = "localhost:50053") -> str:
    """The server a client of ours talks to: GRPC_SERVER (as the seed's tools take it)."""
    return os.environ.get("GRPC_SERVER") or default


def client_credentials() -> tuple[str | None, str | None]:
    """(token, CA file) of our clients: LIPSYNC_TOKEN, LIPSYNC_TLS_CA."""
    return os.environ.get("LIPSYNC_TOKEN") or None, os.environ.get("LIPSYNC_TLS_CA") or None


def retired_environment() -> list[str]:
    """A line for each retired variable that is set (logged at start)."""
    return [f"{name} is set but no longer used: {why}" for name, why in ENV_RETIRED.items()
            if name in os.environ]
