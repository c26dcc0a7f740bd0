"""Every ZeroMQ endpoint and shared-memory arena name, derived from the config only.

Roles rendezvous through these names, so the same code runs under `lipsync serve` or as
separate systemd units. Nothing else invents an address.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.shm.segment import segment_name


@dataclass(frozen=True)
class Addresses:
    runtime_dir: Path
    instance: str
    ops_endpoint: str = ""

    @classmethod
    def of(cls, cfg: Config) -> Addresses:
        return cls(cfg.runtime.dir, cfg.runtime.instance, cfg.ops.endpoint)

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.runtime_dir / f'{self.instance}-{name}.ipc'}"

    @property
    def frontend_inbox(self) -> str:
        """PULL, bound by the frontend: results, replies and heartbeats from every role."""
        return self._ipc("frontend")

    def worker_inbox(self, gpu_index: int) -> str:
        """PULL, bound by gpu_worker i: requests from the frontend."""
        return self._ipc(f"gpu{gpu_index}")

    def worker_jobs(self, gpu_index: int) -> str:
        """ROUTER, bound by gpu_worker i: compositing jobs, handed to the compositors that
        have room (each connects a DEALER and grants credits on it)."""
        return self._ipc(f"gpu{gpu_index}-jobs")

    def worker_events(self, gpu_index: int) -> str:
        """PUB, bound by gpu_worker i: segment releases, subscribed by every compositor."""
        return self._ipc(f"gpu{gpu_index}-events")

    @property
    def ops(self) -> str:
        """ROUTER, bound by the frontend: JSON stats for operators (`lipsync stats`, any REQ)."""
        return self.ops_endpoint or self._ipc("ops")

    def role_lock(self, role: str) -> Path:
        """The lock file one process of `role` (e.g. "gpu_worker 0") holds while it runs."""
        return self.runtime_dir / f"{self.instance}-{role.replace(' ', '')}.lock"

    def request_arena(self) -> str:
        """The frontend's request arena (inputs and UNet outputs), named by its creator."""
        return segment_name(self.instance, "requests")

    def background_arena(self, gpu_index: int, serial: int) -> str:
        """One model load's decoded backgrounds, created by the gpu_worker that loads it."""
        return segment_name(self.instance, f"gpu{gpu_index}-bg{serial}")
