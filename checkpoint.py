"""Checkpoint files: written atomically with the previous file kept as ``*.prev``, read
(falling back to ``.prev`` when the latest is corrupt, which is set aside as ``*.corrupt``
once the run writes again), and checked (writable path; ours or the reference's format).
What a checkpoint holds is train_state.py's: this module only writes, reads and checks files.
"""
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from utils import ConfigError, unwritable_reason

FORMAT = "adaptive-span-checkpoint/1"


def previous_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, fsync, keep the previous file as ``*.prev``, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_reference(ckpt: dict) -> bool:
    return ckpt.get("format") != FORMAT


def _try_load(path: Path) -> Tuple[Optional[dict], str]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or foreign file
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        return None, "not a checkpoint (no 'model' entry)"
    return ckpt, ""


def load_checkpoint(path: Path, log=print) -> Optional[dict]:
    """The latest checkpoint at ``path``, or its ``.prev`` when the latest is corrupt;
    None when there is none. Reads only: a run that goes on to train calls
    ``set_aside_unreadable`` first, so that its next save does not rotate the corrupt
    file into ``.prev``."""
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        return None
    why = ""  # why the latest file cannot be read
    if path.exists():
        ckpt, why = _try_load(path)
        if ckpt is not None:
            return ckpt
        if not prev.exists():
            raise ConfigError(f"--checkpoint {path}: cannot be read ({why}) and there is no previous "
                              f"checkpoint {prev.name}; move the file away to start afresh")
    ckpt, why_prev = _try_load(prev)
    if ckpt is None:
        raise ConfigError(f"--checkpoint {path}: neither it nor {prev.name} can be read ({why_prev})")
    if why:
        log(f"warning: checkpoint {path} cannot be read ({why}); using the previous one, {prev}")
        ckpt[UNREADABLE] = why
    return ckpt


UNREADABLE = "_unreadable_latest"  # set on a loaded .prev when the latest file was corrupt


def set_aside_unreadable(ckpt: Optional[dict], path: Path, log=print) -> None:
    """Rename the corrupt latest file ``*.corrupt`` (once the run is about to write)."""
    path = Path(path)
    if ckpt is not None and ckpt.get(UNREADABLE) and path.exists():
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log(f"the unreadable checkpoint is now {aside.name}")


def require_checkpoint(path: str, log=print) -> dict:
    """The checkpoint to evaluate or sample from: not finding it is an error."""
    ckpt = load_checkpoint(Path(path), log) if path else None
    if ckpt is None:
        raise ConfigError(f"--checkpoint {path}: no such file (nor {previous_path(Path(path)).name}); "
                          "give the path of a checkpoint written by main.py, or a reference checkpoint")
    return ckpt


def check_writable(path: str) -> None:
    """The checkpoint can be written: its folder exists or can be made, and is writable."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--checkpoint {path} is a folder; give a file path such as {target / 'run.pt'}")
    reason = unwritable_reason(target.parent)
    if reason:
        raise ConfigError(f"--checkpoint {path} cannot be written: {reason}; choose another --checkpoint path")


def write_checkpoint(ckpt: dict, path: Path) -> None:
    """Atomically, keeping the previous file as ``*.prev``."""
    atomic_save({"format": FORMAT, **ckpt}, Path(path))


def cache_megabytes(ckpt: dict) -> float:
    """Size of the attention caches a checkpoint carries, in MB."""
    return sum(c.numel() * c.element_size() for r in ckpt["ranks"]
               for c in r["train_cache"] + r["valid_cache"]) / 2**20
