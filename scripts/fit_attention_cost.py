"""Fit the constants of the grouped path's cost model (attention.py: ELEM_COST,
GROUP_COST, CHUNK_COST), not a test.

Times ``_group_attention`` forward+backward (span mask, no persistent memory) over
random shapes and fits, by least squares with non-negative terms,

    seconds = a * MACs + b * elements

where MACs and elements are those of ``attention.group_cost``; then the fixed costs
of a group (c) and of an extra query chunk (e) from the time the fit leaves over in
the smallest groups (B=1, M=16 or 128, W=64, G=1, D=8, H=32), which is nearly all
overhead. Prints b/a, c/a and e/a, the constants in multiply-add equivalents.

Dimension legend: B batch, M block length, W window, G heads of the group, D head dim,
H hidden.

    OMP_NUM_THREADS=1 python scripts/fit_attention_cost.py [--cases 60] [--seed 0]
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import _group_attention, chunk_size  # noqa: E402


def time_case(B, M, W, G, D, H, chunk, repeats=5) -> float:
    # trained-model scales: logits of order 1 (saturated softmaxes would time denormals)
    q = (torch.randn(B, G, M, D) / D ** 0.5).requires_grad_()  # (B, G, M, D)
    h = torch.randn(B, W + M, H, requires_grad=True)  # (B, W+M, H)
    wk = (torch.randn(G * D, H) / H ** 0.5).requires_grad_()  # (G*D, H)
    wv = (torch.randn(G * D, H) / H ** 0.5).requires_grad_()  # (G*D, H)
    pe = torch.randn(1, D, W, requires_grad=True)  # (1, D, W)
    mask = torch.rand(G, 1, W, requires_grad=True)  # (G, 1, W)
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        out = _group_attention(q, h, wk, wv, pe, mask, None, slice(0, G), chunk, 0.0, True)  # (B, G, M, D)
        out.sum().backward()
        if r:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def features(B, M, W, G, D, H, c) -> list:
    macs = B * G * (M * D * (2 * (c + W) + W) + 2 * D * H * (W + M))
    elems = B * G * M * (W + 2 * (c + W))
    return [macs, elems]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    rows, secs = [], []
    for _ in range(args.cases):
        B, M = rng.choice([1, 2, 4, 8]), rng.choice([64, 128, 256])
        W, G, D = rng.choice([64, 128, 256, 512, 1024]), rng.choice([1, 2, 4, 8]), rng.choice([32, 64])
        H = D * rng.choice([4, 8])
        c = rng.choice([M, chunk_size(M, W)])
        rows.append(features(B, M, W, G, D, H, c))
        secs.append(time_case(B, M, W, G, D, H, c))
    coef = fit_nonnegative(np.array(rows)[:, :2], np.array(secs))
    fit = np.array(rows)[:, :2] @ coef
    tiny = (1, 16, 64, 1, 8, 32, 16)
    group = time_case(*tiny, repeats=21) - np.array(features(*tiny)[:2]) @ coef
    two = (1, 128, 64, 1, 8, 32)
    chunk = time_case(*two, 64, repeats=21) - time_case(*two, 128, repeats=21)
    print(f"seconds per MAC {coef[0]:.3g} ({1 / coef[0] / 1e9:.1f} GMAC/s)")
    print(f"ELEM_COST {coef[1] / coef[0]:.1f}  GROUP_COST {group / coef[0]:.3g}  "
          f"CHUNK_COST {chunk / coef[0]:.3g}")
    print(f"median relative error of the fit {np.median(np.abs(fit - secs) / secs):.2f}")


def fit_nonnegative(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of the relative error with every coefficient >= 0 (a term whose
    coefficient comes out negative is dropped and the rest refitted)."""
    Xw, yw = X / y[:, None], np.ones_like(y)
    active = list(range(X.shape[1]))
    while True:
        scale = Xw[:, active].max(0)
        sol = np.linalg.lstsq(Xw[:, active] / scale, yw, rcond=None)[0] / scale
        if (sol >= 0).all():
            coef = np.zeros(X.shape[1])
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))


if __name__ == "__main__":
    main()
