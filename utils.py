"""Process-level helpers: distributed setup, stop signals, random states, writable folders, metrics.

This file and main.py are the only ones that touch ``torch.distributed``.
"""
import json
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from errors import ConfigError  # noqa: F401  (re-exported: the scripts import it from here)


# ---- distributed -------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---- signals -------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM's warnings before preemption) and SIGINT (Ctrl-C) ask the
    ranks to agree on a step, write a checkpoint and exit: status 0 after SIGTERM / SIGUSR1
    (the scheduler's stop), 130 after Ctrl-C. A second Ctrl-C more than REPEAT_S seconds
    after the first aborts at once without saving (torchrun forwards the first one to its
    workers within milliseconds: that copy is not a second press)."""
    REPEAT_S = 3.0

    def __init__(self):
        self.requested = False
        self.interrupted_at = None  # time of the first SIGINT
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum != signal.SIGINT:
            self.requested = True
        elif self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
        elif time.monotonic() - self.interrupted_at > self.REPEAT_S:
            raise KeyboardInterrupt

    @staticmethod
    @contextmanager
    def restoring():
        """Put back the signal handlers of before (for callers of main.main in one process)."""
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agreed(self, dist: DistInfo):
        """None to go on; else the exit status every rank agrees on (130 if any rank had Ctrl-C)."""
        flags = torch.tensor([float(self.requested), float(self.interrupted_at is not None)], device=dist.device)
        term, interrupt = all_reduce_sum(flags, dist).tolist() if dist.enabled else flags.tolist()
        return 130 if interrupt else 0 if term else None


# ---- random states -------------------------------------------------------------
def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def rng_state() -> dict:
    """Every global random state, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- files -------------------------------------------------------------------
def unwritable_reason(folder: Path) -> str:
    """Why files cannot be created in ``folder`` (made if missing), or '' when they can.
    Writes nothing. A folder without any write permission bit counts as read-only even
    for root, who could write there."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    mode = existing.stat().st_mode
    if not os.access(existing, os.W_OK | os.X_OK) or not mode & 0o222:
        return f"the folder {existing} is not writable"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"the folder {existing} is on a read-only file system"
    return ""


# ---- metrics -----------------------------------------------------------------
class MetricsLog:
    """TensorBoard scalars and a ``metrics.jsonl`` with the same figures (rank 0 only)."""

    def __init__(self, folder: Optional[Path], enabled: bool):
        self.folder = Path(folder) if folder else None
        self.enabled = enabled and self.folder is not None
        self.writer = None
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.folder))
            except ImportError:
                self.writer = None

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def histogram(self, step: int, tag: str, values) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def image(self, step: int, tag: str, image_hwc: np.ndarray) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
