"""Checkpoints: our resumable format and the reference implementation's.

Ours is a ``torch.save`` dict that loads with ``weights_only=True``: ``format``, what
``Trainer.state_dict()`` gives (``model``, ``optimizer``, ``step``, ``scheduler_iter``,
``iter_loss`` and ``iter_step`` (the running sum and the steps of the current iteration),
``nonfinite``, ``scaler``, ``world_size`` and ``ranks``: per rank, every random state,
the train and validation stream positions and caches) and what main.py adds: ``config``
(model / train / data, the data with its path, unit, split and fingerprint), ``vocab``,
``iter_no`` (completed iterations) and ``logger`` (the logged history). This module
only writes, reads and checks the files: it is written atomically and the previous
file is kept as ``*.prev``.

The reference's is ``{iter_no, model, logger, optimizer[, scheduler_iter]}`` with
``module.``-prefixed parameter names.
"""
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from models import from_reference_state_dict
from utils import ConfigError, atomic_save, previous_path, unwritable_reason

FORMAT = "adaptive-span-checkpoint/1"


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


def model_state(ckpt: dict) -> dict:
    return from_reference_state_dict(ckpt["model"]) if is_reference(ckpt) else ckpt["model"]


def load_model_state(model: torch.nn.Module, ckpt: dict, path) -> None:
    """Load weights, with one clear error when the checkpoint does not match the model."""
    state = model_state(ckpt)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = (shapes[:2] + [f"missing {missing[:3]}"] * bool(missing)
                  + [f"unexpected {unexpected[:3]}"] * bool(unexpected))
        raise ConfigError(f"--checkpoint {path} does not match the model built from the flags "
                          f"({'; '.join(detail)}); pass the flags it was trained with")
    model.load_state_dict(state)


def cache_megabytes(ckpt: dict) -> float:
    """Size of the attention caches a checkpoint carries, in MB."""
    return sum(c.numel() * c.element_size() for r in ckpt["ranks"]
               for c in r["train_cache"] + r["valid_cache"]) / 2**20
