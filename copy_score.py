"""Scoring a planted corpus: bpc on copied and on ordinary positions apart.

Dimension legend: B rows (streams), M block length, T tokens of the split.

``token_nll`` runs a model over a split as the whole-set evaluation does (trainer.evaluate
without --reference-eval: ``batch_size`` contiguous rows from ``data.eval_rows``, each a
stream from an empty cache, blocks of ``block`` with the cache carried) and returns every
target's NLL at its position in the split. ``score`` splits those by the side file
(planted.py): ordinary positions, copied positions whose source lies inside the same row
(so a head can reach it), and copied positions whose source lies before the row's start
(no span can reach it; reported apart). Copied positions are also scored per distance
octave [64, 128), [128, 256), ...
"""
import math
from typing import Dict, Tuple

import numpy as np
import torch

from data import eval_rows

LN2 = math.log(2.0)


@torch.no_grad()
def token_nll(model, ids: np.ndarray, batch_size: int, block: int,
              device: torch.device = torch.device("cpu")) -> Tuple[np.ndarray, np.ndarray]:
    """Per position t of ``ids``: the NLL (nats) of token t given what its row saw (NaN at
    t = 0, never scored), and the position where t's row (stream) starts."""
    model.eval()
    inputs, targets, mask = eval_rows(ids, batch_size)  # (B, n) each
    nll = np.zeros(inputs.shape, dtype=np.float64)  # (B, n)
    caches = model.init_cache(batch_size, device)
    for b in range(math.ceil(inputs.shape[1] / block)):
        cols = slice(b * block, (b + 1) * block)
        x = torch.from_numpy(np.ascontiguousarray(inputs[:, cols])).to(device)  # (B, M)
        y = torch.from_numpy(np.ascontiguousarray(targets[:, cols])).to(device)  # (B, M)
        out, caches = model(x, caches, y)  # (B, M)
        nll[:, cols] = out.double().cpu().numpy()
    per_pos = np.full(len(ids), np.nan)  # (T,)
    row_start = np.zeros(len(ids), dtype=np.int64)  # (T,)
    start = 1
    for r in range(batch_size):
        size = int(mask[r].sum())
        per_pos[start: start + size] = nll[r, :size]
        row_start[start: start + size] = start - 1  # the row's first input token
        start += size
    return per_pos, row_start


def _bpc(values: np.ndarray) -> float:
    return float(values.mean() / LN2) if values.size else math.nan


def score(nll: np.ndarray, dist: np.ndarray, row_start: np.ndarray) -> Dict[str, dict]:
    """bpc and token counts of ``ordinary``, ``copied`` (source in the row), ``copied_unseen``
    (source before the row's start) and ``copied_<lo>-<hi>`` per distance octave.
    ``nll``, ``dist`` (planted.copy_distances) and ``row_start`` are per position (T,)."""
    scored = ~np.isnan(nll)  # (T,)
    positions = np.arange(len(nll))  # (T,)
    copied = scored & (dist > 0)  # (T,)
    seen = copied & (positions - dist >= row_start)  # (T,)
    groups = {"ordinary": scored & (dist == 0), "copied": seen, "copied_unseen": copied & ~seen}
    if seen.any():
        lo = 2 ** int(math.floor(math.log2(dist[seen].min())))
        while lo <= dist[seen].max():
            groups[f"copied_{lo}-{2 * lo - 1}"] = seen & (dist >= lo) & (dist < 2 * lo)
            lo *= 2
    return {name: {"bpc": _bpc(nll[where]), "tokens": int(where.sum())} for name, where in groups.items()}
