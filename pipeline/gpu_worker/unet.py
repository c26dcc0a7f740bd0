"""The avatar's UNet as the config asks for it: at its precision, and replaying captured
CUDA graphs where that is asked for and possible."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.gpu_worker.cuda_graphs import GraphedUNet
from pipeline.gpu_worker.device import Resolved
from pipeline.gpu_worker.sessions import UNet, unet_session

log = logging.getLogger(__name__)


def load_unet(path: Path, provider: Resolved, intra_op_threads: int = 0,
              precision: str = "fp32", cuda_graphs: bool = False) -> UNet:
    """The UNet at `precision`; with `cuda_graphs` on CUDA, one that replays captured graphs
    (on the CPU the option is ignored, and says so)."""
    graphs = cuda_graphs and provider == "cuda"
    if cuda_graphs and not graphs:
        log.warning("gpus.cuda_graphs ignored: CUDA graphs need the CUDA execution "
                    "provider and this worker runs on the CPU")
    session = unet_session(path, provider, intra_op_threads, precision, graphs)
    return GraphedUNet(session) if graphs else UNet(session)
