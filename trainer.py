"""Optimisation, training iterations and evaluation.

The order inside a step is the reference's: zero the gradients; forward and
backward per batch split (loss / S, span loss included); set the warm-up learning
rate of update t (counted from 1); clip; optimizer step; clamp the spans.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from tqdm import tqdm

from data import Stream, batchify, eval_rows
from utils import ConfigError, DistInfo, all_reduce_sum

LN2 = math.log(2)


@dataclass
class TrainConfig:
    optim: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    grad_clip: float = 0.0
    lr_warmup: int = 0
    batch_size: int = 64  # global, over all ranks
    batch_split: int = 1
    block_size: int = 64
    nbatches: int = 1000
    niter: int = 1000
    seed: int = 1111
    max_nonfinite: int = 10
    amp: str = "none"


class AdagradWithGradClip(torch.optim.Optimizer):
    """The reference's Adagrad: per-tensor clipping scales the step size, not the gradient,
    and the accumulator adds the unclipped g^2."""

    def __init__(self, params, lr: float, grad_clip: float = 0.0, eps: float = 1e-10):
        defaults = dict(lr=lr, lr_decay=0, eps=eps, weight_decay=0, initial_accumulator_value=0,
                        grad_clip=grad_clip)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, in a few multi-tensor (foreach)
        operations and without host syncs: the per-tensor clip factor
        ``min(1, clip / (|g| + 1e-10))`` is applied on the device."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = torch.tensor(0.0)
                    self.state[p]["sum"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            steps = [self.state[p]["step"] for p in params]
            sums = [self.state[p]["sum"] for p in params]
            torch._foreach_add_(steps, 1)
            torch._foreach_addcmul_(sums, grads, grads, value=1)
            std = torch._foreach_sqrt(sums)
            torch._foreach_add_(std, group["eps"])
            if group["grad_clip"] <= 0 and group["lr_decay"] == 0:
                torch._foreach_addcdiv_(params, grads, std, value=-group["lr"])
                continue
            rate = self._step_sizes(group, grads, steps)  # (P,)
            updates = torch._foreach_div(grads, std)
            torch._foreach_mul_(updates, [r.to(p.device) for r, p in zip(rate.unbind(), params)])
            torch._foreach_add_(params, updates)

    @staticmethod
    def _step_sizes(group: dict, grads: list, steps: list) -> torch.Tensor:
        """Per tensor: minus the learning rate, decayed, times the clip factor. (P,)"""
        device = grads[0].device
        rate = torch.full((len(grads),), -group["lr"], dtype=torch.float64, device=device)  # (P,)
        if group["lr_decay"] != 0:
            count = torch.stack([s.to(device) for s in steps]).double()  # (P,)
            rate = rate / (1 + (count - 1) * group["lr_decay"])  # (P,)
        if group["grad_clip"] > 0:
            clip = group["grad_clip"]
            norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)]).double()  # (P,)
            rate = rate * torch.where(norms > clip, clip / (norms + 1e-10), 1.0)  # (P,)
        return rate.float()  # (P,)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optim == "adagrad":
        return AdagradWithGradClip(params, lr=cfg.lr, grad_clip=cfg.grad_clip)
    return torch.optim.Adam(params, lr=cfg.lr)


def lr_at(update: int, cfg: TrainConfig) -> float:
    """Linear warm-up ``min(1, t / warmup)`` for update t counted from 1, then constant."""
    return cfg.lr * (min(1.0, update / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0)


def to_unit(nll: float, unit: str) -> float:
    return nll / LN2 if unit == "bpc" else math.exp(min(nll, 700.0))


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
        self.train_cache = [torch.cat(p, dim=0) for p in parts]  # (B, C, H)
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
            self.train_cache = [torch.zeros_like(c) for c in self.train_cache]
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
            self.train_cache = [c if torch.isfinite(c).all() else torch.zeros_like(c) for c in self.train_cache]
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
                self.valid_cache = [torch.zeros_like(c) for c in self.valid_cache]
        all_reduce_sum(total, self.dist)
        return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate(ddp_model, model, ids: np.ndarray, batch_size: int, block: int, dist: DistInfo,
             reference: bool = False, amp: str = "none", desc: str = "eval") -> Tuple[float, int]:
    """Mean token NLL (nats) and the number of scored tokens over a whole split.

    Each of ``batch_size`` rows is a stream from an empty cache. By default every token
    (but the split's first) is scored, the last partial block included. With ``reference``
    the reference protocol: full blocks only, each row's tail skipped, mean of block means.
    """
    if batch_size % dist.world_size:
        raise ConfigError(f"--batch-sz {batch_size} must be divisible by the {dist.world_size} ranks for evaluation")
    ddp_model.eval()
    local = batch_size // dist.world_size
    rows = slice(dist.rank * local, (dist.rank + 1) * local)
    if reference:
        data = batchify(ids, batch_size)[rows]  # (B', n)
        inputs, targets, mask = data[:, :-1], data[:, 1:], np.ones_like(data[:, 1:], dtype=bool)
        # the reference stops after the first block k with k * block >= ncols - block
        ncols = data.shape[1]
        nblocks = min(max(1, math.ceil((ncols - block) / block)), math.ceil(ncols / block))
    else:
        inputs, targets, mask = (a[rows] for a in eval_rows(ids, batch_size))  # (B', n) each
        nblocks = math.ceil(inputs.shape[1] / block)
    caches = model.init_cache(local, dist.device)
    sums = torch.zeros(nblocks, 2, dtype=torch.float64, device=dist.device)  # per block: nll, count
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    bar = tqdm(range(nblocks), desc=desc, disable=True if not dist.is_main or nblocks < 20 else None, leave=False)
    for b in bar:
        cols = slice(b * block, (b + 1) * block)
        x = torch.from_numpy(np.ascontiguousarray(inputs[:, cols], dtype=np.int64)).to(dist.device)
        y = torch.from_numpy(np.ascontiguousarray(targets[:, cols], dtype=np.int64)).to(dist.device)
        m = torch.from_numpy(np.ascontiguousarray(mask[:, cols])).to(dist.device)
        with torch.autocast(dist.device.type, dtype=dtype) if dtype else nullcontext():
            nll, caches = ddp_model(x, caches, y)  # (B', m)
        sums[b, 0] = (nll.double() * m).sum()
        sums[b, 1] = m.sum()
    all_reduce_sum(sums, dist)
    count = int(sums[:, 1].sum().item())
    if reference:
        return (sums[:, 0] / sums[:, 1]).mean().item(), count
    return (sums[:, 0].sum() / sums[:, 1].sum()).item(), count
