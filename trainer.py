"""One training step and the rolling validation of one rank.

The order inside a step is the reference's: zero the gradients; forward and
backward per batch split (loss / S, span loss included); set the warm-up learning
rate of update t (counted from 1); clip; optimizer step; clamp the spans.
train_state.py saves and restores everything a ``Trainer`` holds.
"""
import math
from contextlib import nullcontext
from typing import List, Tuple

import numpy as np
import torch

from config import TrainConfig
from data import Stream, batchify
from optim import lr_at
from utils import DistInfo, all_reduce_sum


class Trainer:
    """Holds the model, optimizer, streams and caches of one rank."""

    def __init__(self, ddp_model, model, optimizer, cfg: TrainConfig, dist: DistInfo,
                 train_ids: np.ndarray, valid_ids: np.ndarray):
        self.ddp_model, self.model, self.optimizer = ddp_model, model, optimizer
        self.cfg, self.dist = cfg, dist
        self.local_batch = cfg.batch_size // dist.world_size
        rows = slice(dist.rank * self.local_batch, (dist.rank + 1) * self.local_batch)
        self.train_stream = Stream(batchify(train_ids, cfg.batch_size)[rows], cfg.block_size, cfg.seed)
        self.valid_stream = Stream(batchify(valid_ids, cfg.batch_size)[rows], cfg.block_size, cfg.seed + 1)
        self.train_cache = model.init_cache(self.local_batch, dist.device)
        self.valid_cache = model.init_cache(self.local_batch, dist.device)
        self.step = 0  # optimizer updates attempted so far (skipped ones included)
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.iter_loss = 0.0  # sum of the step losses of the current iteration
        self.iter_count = 0  # steps of the current iteration that were applied
        self.iter_step = 0  # steps of the current iteration attempted (skipped ones included)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    # ---- one step ----------------------------------------------------------
    def _autocast(self):
        if self.cfg.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _forward_backward(self, x, y) -> torch.Tensor:
        """Forward and backward of every batch split; returns the mean token NLL."""
        S = self.cfg.batch_split
        rows = x.size(0) // S
        parts: List[List[torch.Tensor]] = [[] for _ in self.train_cache]
        loss_sum = torch.zeros((), device=x.device)
        for s in range(S):
            sl = slice(s * rows, (s + 1) * rows)
            sync = self.dist.enabled and s < S - 1
            with self.ddp_model.no_sync() if sync else nullcontext():
                with self._autocast():
                    nll, caches = self.ddp_model(x[sl], [c[sl] for c in self.train_cache], y[sl])  # (B/S, M)
                loss = nll.float().mean()
                total = (loss + self.model.span_loss()) / S
                (self.scaler.scale(total) if self.scaler else total).backward()
            loss_sum += loss.detach()
            for parts_l, c in zip(parts, caches):
                parts_l.append(c)
        self.train_cache = [self.model.join_rows(p) for p in parts]  # (B, C, H)
        return loss_sum / S

    def _update(self) -> Tuple[float, bool]:
        """Learning rate, clipping, optimizer step, span clamp; skips non-finite gradients."""
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item() if params else 0.0
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            return norm, False
        if self.cfg.grad_clip > 0 and self.cfg.optim != "adagrad":
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.clamp_spans()
        return norm, True

    def train_step(self) -> dict:
        self.ddp_model.train()
        x, y = self.train_stream.next_block()
        x, y = x.to(self.dist.device), y.to(self.dist.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(x, y)
        norm, applied = self._update()
        if self.train_stream.advance():
            self.train_cache = self.model.clear_cache(self.train_cache)
        loss = loss.item()
        self.iter_step += 1
        if applied and math.isfinite(loss):
            self.nonfinite_in_row = 0
            self.iter_loss += loss
            self.iter_count += 1
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            # a forward that overflowed must not poison the next blocks through the cache
            self.train_cache = [c if torch.isfinite(c).all() else self.model.clear_cache([c])[0]
                                for c in self.train_cache]
        return {"loss": loss, "grad_norm": norm, "applied": applied and math.isfinite(loss)}

    def sync_iteration(self) -> None:
        """Average the running loss of the iteration over the ranks (idempotent)."""
        totals = torch.tensor([self.iter_loss, self.iter_count], dtype=torch.float64, device=self.dist.device)
        totals = all_reduce_sum(totals, self.dist) / self.dist.world_size
        self.iter_loss, self.iter_count = totals[0].item(), round(totals[1].item())

    def end_iteration(self) -> float:
        """Mean training NLL of the iteration's applied steps (nan if none); resets the counters."""
        self.sync_iteration()
        nll = self.iter_loss / self.iter_count if self.iter_count else math.nan
        self.iter_loss, self.iter_count, self.iter_step = 0.0, 0, 0
        return nll

    # ---- evaluation --------------------------------------------------------
    @torch.no_grad()
    def validate(self, nblocks: int) -> float:
        """Rolling partial validation (the reference's in-training 'val'): mean token NLL."""
        self.ddp_model.eval()
        nblocks = max(1, min(nblocks, math.ceil(self.valid_stream.rows.shape[1] / self.cfg.block_size)))
        total = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for _ in range(nblocks):
            x, y = self.valid_stream.next_block()
            with self._autocast():
                nll, self.valid_cache = self.ddp_model(x.to(self.dist.device), self.valid_cache,
                                                       y.to(self.dist.device))  # (B, M)
            total += torch.stack([nll.double().sum(), torch.tensor(nll.numel(), device=nll.device)])
            if self.valid_stream.advance():
                self.valid_cache = self.model.clear_cache(self.valid_cache)
        all_reduce_sum(total, self.dist)
        return (total[0] / total[1]).item()
