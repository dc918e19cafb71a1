"""Evaluation over whole splits: our protocol (every token) and the reference's
(full blocks only, mean of the block means), and --full-eval-mode's report."""
import math
from contextlib import nullcontext
from typing import Tuple

import numpy as np
import torch
from tqdm import tqdm

from data import batchify, eval_rows
from utils import ConfigError, DistInfo, all_reduce_sum

LN2 = math.log(2)


def to_unit(nll: float, unit: str) -> float:
    return nll / LN2 if unit == "bpc" else math.exp(min(nll, 700.0))


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


def full_eval(s, ddp_model, model, corpus, dist: DistInfo, log) -> int:
    """--full-eval-mode: the whole valid and test sets, one line each; the exit status."""
    unit = s.data.unit
    for split in ("valid", "test"):
        nll, count = evaluate(ddp_model, model, corpus.split(split), s.train.batch_size, s.train.block_size,
                              dist, reference=s.run.reference_eval, amp=s.train.amp, desc=split)
        name = "val" if split == "valid" else "test"
        log(f"{name}: {to_unit(nll, unit):.4f}{unit} tokens: {count} nll: {nll:.6f}")
    return 0
