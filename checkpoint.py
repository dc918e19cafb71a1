"""Checkpoints: our resumable format and the reference implementation's.

Ours is a ``torch.save`` dict that loads with ``weights_only=True``:
``format``, ``config`` (model / train / data), ``vocab``, ``iter_no`` (completed
iterations), ``step``, ``model``, ``optimizer``, ``scheduler_iter``, ``logger``
(the logged history), ``iter_loss`` and ``iter_step`` (the running sum and the steps of
the current iteration),
``nonfinite`` and ``ranks``: per rank, every random state, the train and
validation stream positions and caches. It is written atomically and the
previous file is kept as ``*.prev``.

The reference's is ``{iter_no, model, logger, optimizer[, scheduler_iter]}`` with
``module.``-prefixed parameter names.
"""
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from models import from_reference_state_dict
from trainer import Trainer
from utils import ConfigError, previous_path, rng_state, set_rng_state

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


def load_checkpoint(path: Path, log=print, set_aside: bool = False) -> Optional[dict]:
    """The latest checkpoint at ``path``, or its ``.prev`` when the latest is corrupt;
    None when there is none. With ``set_aside`` (the writing rank) a corrupt latest file is
    renamed ``*.corrupt``, so that the next save does not rotate it into ``.prev``."""
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
        aside = path.with_name(path.name + ".corrupt")
        if set_aside and path.exists():
            os.replace(path, aside)
        log(f"warning: checkpoint {path} cannot be read ({why}); using the previous one, {prev}"
            + (f" (the unreadable file is now {aside.name})" if set_aside else ""))
    return ckpt


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


def _rank_state(trainer: Trainer) -> dict:
    return {"rng": rng_state(),
            "train_stream": trainer.train_stream.state_dict(),
            "valid_stream": trainer.valid_stream.state_dict(),
            "train_cache": [c.detach().cpu() for c in trainer.train_cache],
            "valid_cache": [c.detach().cpu() for c in trainer.valid_cache]}


def gather_rank_states(trainer: Trainer, gather) -> List[dict]:
    """Every rank's state, collected on all ranks with ``gather`` (utils.all_gather_objects)."""
    return gather(_rank_state(trainer))


def build_checkpoint(trainer: Trainer, ranks: List[dict], config: dict, vocab: dict,
                     iter_no: int, logger: dict) -> dict:
    return {"format": FORMAT, "config": config, "vocab": vocab, "iter_no": iter_no,
            "step": trainer.step, "scheduler_iter": trainer.step,
            "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "logger": logger, "iter_loss": [trainer.iter_loss, trainer.iter_count],
            "iter_step": trainer.iter_step,
            "nonfinite": [trainer.nonfinite_in_row, trainer.nonfinite_total],
            "world_size": len(ranks), "ranks": ranks,
            "scaler": trainer.scaler.state_dict() if trainer.scaler else {}}


def cache_megabytes(ranks: List[dict]) -> float:
    return sum(c.numel() * c.element_size() for r in ranks
               for c in r["train_cache"] + r["valid_cache"]) / 2**20


def _reshard(tensors_per_rank: List[List[torch.Tensor]], world: int, rank: int) -> List[torch.Tensor]:
    """Per-layer caches of the old ranks, concatenated over rows, re-cut for ``world`` ranks."""
    out = []
    for layer in zip(*tensors_per_rank):
        size = min(t.size(1) for t in layer)
        full = torch.cat([t[:, t.size(1) - size:] for t in layer], dim=0)  # (B, C, H)
        rows = full.size(0) // world
        out.append(full[rank * rows:(rank + 1) * rows])  # (B/W, C, H)
    return out


def restore_trainer(trainer: Trainer, ckpt: dict, log=print) -> None:
    """Optimizer, step and this rank's streams, caches and random states."""
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    for group in trainer.optimizer.param_groups:
        group["grad_clip"] = trainer.cfg.grad_clip  # the command line's clip, as the reference
    trainer.step = int(ckpt.get("scheduler_iter", ckpt.get("step", 0)) or 0)
    if is_reference(ckpt):
        return  # the reference saves no stream positions, caches or random states
    trainer.iter_loss, trainer.iter_count = ckpt["iter_loss"]
    trainer.iter_step = int(ckpt["iter_step"])
    if trainer.scaler and ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.nonfinite_in_row, trainer.nonfinite_total = ckpt["nonfinite"]
    ranks, dist = ckpt["ranks"], trainer.dist
    if len(ranks) == dist.world_size:
        mine = ranks[dist.rank]
        trainer.train_cache = [c.to(dist.device) for c in mine["train_cache"]]
        trainer.valid_cache = [c.to(dist.device) for c in mine["valid_cache"]]
        set_rng_state(mine["rng"])
    else:
        log(f"resuming {len(ranks)}-rank state on {dist.world_size} ranks: caches resharded, "
            "stream positions kept, dropout random states re-derived from rank 0's")
        trainer.train_cache = [c.to(dist.device) for c in _reshard([r["train_cache"] for r in ranks],
                                                                  dist.world_size, dist.rank)]
        trainer.valid_cache = [c.to(dist.device) for c in _reshard([r["valid_cache"] for r in ranks],
                                                                  dist.world_size, dist.rank)]
        set_rng_state(ranks[0]["rng"])
        torch.manual_seed(int(torch.randint(2**31, ()).item()) + dist.rank)
    trainer.train_stream.load_state_dict(ranks[0]["train_stream"])
    trainer.valid_stream.load_state_dict(ranks[0]["valid_stream"])
