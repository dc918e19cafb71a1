"""The train state: everything a resumed run needs, owned by one object that gives and takes
it whole (``state_dict`` / ``load_state_dict``). checkpoint.py writes and reads the files.

What it holds: the settings; the model weights; the optimizer and the step (the learning-rate
schedule is a function of the step; ``scheduler_iter`` is the reference's name for it); the
running loss of the current iteration and the non-finite counters; per rank, every random
state, the train and validation stream positions and caches; the data identity (path, unit,
split, fingerprint and vocabulary); the completed iterations and the logged history.

Our checkpoint dict: ``format`` (checkpoint.FORMAT), ``model``, ``optimizer``, ``step``, ``scheduler_iter``, ``iter_loss``
(running sum and applied steps of the current iteration), ``iter_step``, ``nonfinite``,
``scaler``, ``world_size``, ``ranks``, ``config`` (model / train / data), ``vocab``,
``iter_no`` (the last completed iteration) and ``logger`` (the history). The reference's:
``{iter_no, model, logger, optimizer[, scheduler_iter]}`` with ``module.``-prefixed names.
"""
from pathlib import Path
from typing import List

import torch

from checkpoint import FORMAT, is_reference, previous_path
from data import trained_token_ids
from expire_span import equal_lengths
from models import from_reference_state_dict
from optim import build_optimizer
from settings import Settings
from trainer import Trainer
from utils import ConfigError, DistInfo, all_gather_objects, rng_state, set_rng_state


class TrainState:
    def __init__(self, settings: Settings, model, ddp_model, corpus, dist: DistInfo):
        self.settings, self.model, self.dist = settings, model, dist
        self.optimizer = build_optimizer(model.parameters(), settings.train)
        self.trainer = Trainer(ddp_model, model, self.optimizer, settings.train, dist, corpus.train, corpus.valid)
        self.fingerprint = corpus.fingerprint  # the data's size and sha256
        self.vocab = corpus.vocab
        self.seen = trained_token_ids(corpus)  # byte ids in the training split (generation's warning)
        self.done = 0  # completed iterations
        self.history = {}  # the logged figures: name -> one value per iteration

    @property
    def step(self) -> int:
        return self.trainer.step

    # ---- giving ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole state. A collective: every rank calls it and gets every rank's share.
        Loads with ``torch.load(weights_only=True)``."""
        t = self.trainer
        t.sync_iteration()  # a partial iteration's running loss: every rank resumes with the mean
        ranks = all_gather_objects(self._rank_state(), self.dist)
        config = self.settings.stored(Path(self.settings.data.path).is_file())
        config["data"]["fingerprint"] = self.fingerprint
        return {"format": FORMAT, "step": t.step, "scheduler_iter": t.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iter_loss": [t.iter_loss, t.iter_count], "iter_step": t.iter_step,
                "nonfinite": [t.nonfinite_in_row, t.nonfinite_total],
                "world_size": len(ranks), "ranks": ranks,
                "scaler": t.scaler.state_dict() if t.scaler else {},
                "config": config, "threads": torch.get_num_threads(),  # a resume keeps the count
                "vocab": self._vocab(),
                "iter_no": self.done - 1, "logger": self.history}

    def _vocab(self) -> dict:
        """The vocabulary; for a byte vocabulary also the ids the training split holds."""
        vocab = {"idx2word": self.vocab.idx2word, "style": self.vocab.style}
        return vocab if self.seen is None else {**vocab, "seen": self.seen}

    def _rank_state(self) -> dict:
        t = self.trainer
        return {"rng": rng_state(),
                "train_stream": t.train_stream.state_dict(),
                "valid_stream": t.valid_stream.state_dict(),
                "train_cache": [c.detach().cpu() for c in t.train_cache],
                "valid_cache": [c.detach().cpu() for c in t.valid_cache]}

    # ---- taking ----------------------------------------------------------------------
    def load_state_dict(self, ckpt: dict, source, log=print) -> None:
        """Take a state of ``state_dict()``, or a reference checkpoint (weights, optimizer
        and step only: its streams start afresh). A state of another number of ranks has
        its caches re-cut. ``source``: the checkpoint's path, for the errors."""
        train = self.settings.train
        if is_reference(ckpt):
            ckpt.setdefault("scheduler_iter", (ckpt["iter_no"] + 1) * train.nbatches)
        elif ckpt["config"]["train"]["batch_size"] != train.batch_size:
            raise ConfigError(f"--batch-sz {train.batch_size} differs from the checkpoint's "
                              f"{ckpt['config']['train']['batch_size']}: the streams and caches cannot be "
                              "resumed; resume with the same global batch (any number of ranks that divides it)")
        load_model_state(self.model, ckpt, source)
        self.done, self.history = ckpt["iter_no"] + 1, ckpt.get("logger") or {}
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:
            group["grad_clip"] = train.grad_clip  # the command line's clip, as the reference
        self.trainer.step = int(ckpt.get("scheduler_iter", ckpt.get("step", 0)) or 0)
        if "ranks" in ckpt:  # the reference saves no stream positions, caches or random states
            self._load_counters(ckpt)
            self._load_ranks(ckpt["ranks"], log)

    def _load_counters(self, ckpt: dict) -> None:
        t = self.trainer
        t.iter_loss, t.iter_count = ckpt["iter_loss"]
        t.iter_step = int(ckpt["iter_step"])
        if t.scaler and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        t.nonfinite_in_row, t.nonfinite_total = ckpt["nonfinite"]

    def _load_ranks(self, ranks: List[dict], log) -> None:
        t, dist = self.trainer, self.dist
        if len(ranks) == dist.world_size:
            mine = ranks[dist.rank]
            t.train_cache = [c.to(dist.device) for c in mine["train_cache"]]
            t.valid_cache = [c.to(dist.device) for c in mine["valid_cache"]]
            set_rng_state(mine["rng"])
        else:
            log(f"resuming {len(ranks)}-rank state on {dist.world_size} ranks: caches resharded, "
                "stream positions kept, dropout random states re-derived from rank 0's")
            t.train_cache = _reshard([r["train_cache"] for r in ranks], dist, self.model.cfg)
            t.valid_cache = _reshard([r["valid_cache"] for r in ranks], dist, self.model.cfg)
            set_rng_state(ranks[0]["rng"])
            torch.manual_seed(int(torch.randint(2**31, ()).item()) + dist.rank)
        t.train_stream.load_state_dict(ranks[0]["train_stream"])
        t.valid_stream.load_state_dict(ranks[0]["valid_stream"])

    def resumed_line(self, path: str) -> str:
        """Which file the run resumed from (the latest, or ``.prev`` when the latest was set
        aside as unreadable) and where it continues: the step count and the iteration it is in."""
        source = Path(path) if Path(path).exists() else previous_path(Path(path))
        return f"resumed from {source} at step {self.step} (iteration {self.done})"


def _reshard(tensors_per_rank: List[List[torch.Tensor]], dist: DistInfo, cfg) -> List[torch.Tensor]:
    """Per-layer caches of the old ranks, concatenated over rows, re-cut for this rank: cut to
    the shortest, or with expire span padded to the longest with memories no query weighs."""
    out = []
    for layer in zip(*tensors_per_rank):
        if cfg.expire_span and len({t.size(1) for t in layer}) > 1:
            layer = equal_lengths(list(layer), cfg.attn_lim, cfg.expire_span_ramp)
        size = min(t.size(1) for t in layer)
        full = torch.cat([t[:, t.size(1) - size:] for t in layer], dim=0)  # (B, C, H)
        rows = full.size(0) // dist.world_size
        out.append(full[dist.rank * rows:(dist.rank + 1) * rows].to(dist.device))  # (B/W, C, H)
    return out


def model_state(ckpt: dict) -> dict:
    """The weights of a checkpoint, under our names."""
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
