"""Adaptive input embeddings (Baevski & Auli, 2018) and a projected adaptive
log-softmax (Grave et al., 2017, in the Transformer-XL form), optionally tied,
as used by the reference for WikiText-103. Depends only on torch.

Dimension legend: B batch, M block length, T = B*M flattened tokens,
H hidden, V vocabulary, d_i embedding size of cluster i (H // divval**i),
S_i number of words in cluster i, C = number of tail clusters.

The vocabulary is sorted by training frequency; the cutoffs ``c_1 < ... < c_C``
(then V) split it into C+1 clusters, cluster i holding ids [c_i, c_{i+1}).

Input:  e(w) = sqrt(H) * proj_i @ E_i[w - c_i]           for w in cluster i.
Output: logits of cluster i are  (h @ proj_i) @ W_i^T + b_i,
        the head is cluster 0's logits followed by C cluster logits, computed
        as (h @ proj_0) @ cluster_proj.weight^T + cluster_proj.bias (the
        reference concatenates cluster_proj with cluster 0's output layer);
        log p(w) = head[w]                                       (cluster 0)
        log p(w) = head[-i] + log_softmax(cluster i logits)[w - c_i]  (i >= 1),
        so tail cluster i reads head column -i (reversed cluster order).

Why not ``torch.nn.AdaptiveLogSoftmaxWithLoss``: its head is one Linear(H, .)
applied to h (no (H, H) projection shared with the input), its tails are
Linear(H, d_i, bias=False) -> Linear(d_i, S_i, bias=False) (no output bias, and
a (d_i, H) weight that cannot share storage with the (H, d_i) input
projection), and tail cluster i reads head column S_0 + i - 1 (natural order).
It therefore cannot express this parametrisation, tied or not.

Parameter names follow the reference (``in_emb.emb_layers.{i}.weight``,
``in_emb.emb_projs.{i}``, ``out_emb.cluster_proj.*``, ``out_emb.out_layers.{i}.*``,
``out_emb.out_projs.{i}``); with tying the shared tensors appear under both names
in a state dict.
"""
from typing import Iterable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def cluster_bounds(vocab_size: int, cutoffs: List[int]) -> List[int]:
    """``[0, c_1, ..., c_C, V]``, checked to be strictly increasing."""
    bounds = [0] + list(cutoffs) + [vocab_size]
    if len(bounds) < 3 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"adaptive I/O cutoffs {list(cutoffs)} must be increasing, "
                         f"positive and below the vocabulary size {vocab_size}")
    return bounds


def cluster_dims(hidden_size: int, divval: int, nclusters: int) -> List[int]:
    """Embedding size ``H // divval**i`` of each cluster."""
    dims = [hidden_size // divval ** i for i in range(nclusters)]
    if divval < 1 or dims[-1] < 1:
        raise ValueError(f"adapt-io divval {divval} leaves cluster sizes {dims} for hidden {hidden_size}")
    return dims


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in at least float32 (the reference casts half logits to float)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _projection(d_i: int, hidden_size: int) -> nn.Parameter:
    """A bare (H, d_i) parameter initialised as ``nn.Linear(d_i, H).weight``."""
    return nn.Linear(d_i, hidden_size).weight  # (H, d_i)


class AdaptiveInput(nn.Module):
    """Token ids -> sqrt(H) * proj_i @ E_i[w - c_i]."""

    def __init__(self, vocab_size: int, hidden_size: int, cutoffs: List[int], divval: int):
        super().__init__()
        self.bounds = cluster_bounds(vocab_size, cutoffs)
        self.hidden_size = hidden_size
        self.scale = hidden_size ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        dims = cluster_dims(hidden_size, divval, len(self.bounds) - 1)
        for i, d_i in enumerate(dims):
            self.emb_layers.append(nn.Embedding(self.bounds[i + 1] - self.bounds[i], d_i))
            self.emb_projs.append(_projection(d_i, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)  # (T,)
        out = self.emb_projs[0].new_zeros(flat.numel(), self.hidden_size)  # (T, H)
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)  # (T_i,)
            if idx.numel() == 0:
                continue
            emb = self.emb_layers[i](flat[idx] - lo)  # (T_i, d_i)
            out = out.index_copy(0, idx, F.linear(emb, self.emb_projs[i]))  # (T, H)
        return (out * self.scale).view(*x.shape, self.hidden_size)  # (B, M, H)


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Per-token NLL (``forward``) or full log-probabilities (``log_prob``)."""

    def __init__(self, vocab_size: int, hidden_size: int, cutoffs: List[int], divval: int):
        super().__init__()
        self.bounds = cluster_bounds(vocab_size, cutoffs)
        self.hidden_size = hidden_size
        ntail = len(self.bounds) - 2
        # registration order of the reference: cluster_proj, out_layers, out_projs
        self.cluster_proj = nn.Linear(hidden_size, ntail)
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        dims = cluster_dims(hidden_size, divval, ntail + 1)
        for i, d_i in enumerate(dims):
            self.out_projs.append(_projection(d_i, hidden_size))
            self.out_layers.append(nn.Linear(d_i, self.bounds[i + 1] - self.bounds[i]))

    @property
    def ntail(self) -> int:
        return len(self.bounds) - 2

    def _logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                proj: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h, proj.t()), weight, bias)  # (T, S)

    def head_log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """log-softmax over cluster 0's words then the C cluster logits."""
        weight = torch.cat([self.out_layers[0].weight, self.cluster_proj.weight])  # (S_0+C, H)
        bias = torch.cat([self.out_layers[0].bias, self.cluster_proj.bias])  # (S_0+C,)
        logits = self._logits(h, weight, bias, self.out_projs[0])  # (T, S_0+C)
        return _log_softmax(logits)  # (T, S_0+C)

    def tail_log_prob(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """log-softmax within tail cluster i (i >= 1)."""
        layer = self.out_layers[i]
        logits = self._logits(h, layer.weight, layer.bias, self.out_projs[i])  # (T, S_i)
        return _log_softmax(logits)  # (T, S_i)

    def forward(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """h (..., H), target (...) -> NLL (...), in float32 at least."""
        flat_h = h.reshape(-1, self.hidden_size)  # (T, H)
        flat_t = target.reshape(-1)  # (T,)
        head = self.head_log_prob(flat_h)  # (T, S_0+C)
        logp = head.new_zeros(flat_t.shape)  # (T,)
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((flat_t >= lo) & (flat_t < hi)).nonzero().squeeze(1)  # (T_i,)
            if idx.numel() == 0:
                continue
            local = (flat_t[idx] - lo).unsqueeze(1)  # (T_i, 1)
            if i == 0:
                lp = head[idx].gather(1, local).squeeze(1)  # (T_i,)
            else:
                tail = self.tail_log_prob(flat_h[idx], i)  # (T_i, S_i)
                lp = head[idx, -i] + tail.gather(1, local).squeeze(1)  # (T_i,)
            logp = logp.index_copy(0, idx, lp)  # (T,)
        return -logp.view(target.shape)  # (...)

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> log-probabilities over the whole vocabulary (..., V)."""
        flat_h = h.reshape(-1, self.hidden_size)  # (T, H)
        head = self.head_log_prob(flat_h)  # (T, S_0+C)
        parts = [head[:, :self.bounds[1]]]  # [(T, S_0)]
        for i in range(1, self.ntail + 1):
            parts.append(head[:, -i, None] + self.tail_log_prob(flat_h, i))  # (T, S_i)
        return torch.cat(parts, dim=1).view(*h.shape[:-1], self.bounds[-1])  # (..., V)


def tie_adaptive_io(in_emb: AdaptiveInput, out_emb: ProjectedAdaptiveLogSoftmax) -> None:
    """Share every cluster's embedding matrix and projection (the same Parameter
    objects); output biases and ``cluster_proj`` stay separate."""
    for i, emb in enumerate(in_emb.emb_layers):
        out_emb.out_layers[i].weight = emb.weight
        out_emb.out_projs[i] = in_emb.emb_projs[i]


def build_adaptive_io(vocab_size: int, hidden_size: int, cutoffs: List[int], divval: int,
                      tied: bool) -> Tuple[AdaptiveInput, ProjectedAdaptiveLogSoftmax]:
    in_emb = AdaptiveInput(vocab_size, hidden_size, cutoffs, divval)
    out_emb = ProjectedAdaptiveLogSoftmax(vocab_size, hidden_size, cutoffs, divval)
    if tied:
        tie_adaptive_io(in_emb, out_emb)
    return in_emb, out_emb


def zero_dependency(modules: Iterable[nn.Module]) -> torch.Tensor:
    """0 * (sum of the first element of every parameter): adding it to the loss
    puts every parameter in the graph (zero gradient), so DDP never finds one
    unused when a batch has no word of some cluster."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    return 0 * sum(p.reshape(-1)[0] for p in params)  # ()


_TIED_NAMES = (("in_emb.emb_layers.", "out_emb.out_layers.", ".weight"),
               ("in_emb.emb_projs.", "out_emb.out_projs.", ""))


def tied_counterpart(name: str):
    """The other name of a tensor shared by tying (``in_emb.emb_layers.{i}.weight``
    <-> ``out_emb.out_layers.{i}.weight``, ``in_emb.emb_projs.{i}`` <->
    ``out_emb.out_projs.{i}``), or None. ``name`` may carry a prefix."""
    for a, b, suffix in _TIED_NAMES:
        for src, dst in ((a, b), (b, a)):
            head, sep, tail = name.rpartition(src)
            if sep and tail.endswith(suffix) and tail[:len(tail) - len(suffix)].isdigit() \
                    and (head == "" or head.endswith(".")):
                return head + dst + tail
    return None


def tied_mismatches(state: dict, prefix: str) -> List[str]:
    """Names under ``prefix`` whose tied counterpart holds a different tensor."""
    bad = []
    for name, value in state.items():
        other = tied_counterpart(name) if name.startswith(prefix + "in_emb.") else None
        if other in state and not torch.equal(value, state[other]):
            bad.append(f"{name} != {other}")
    return bad
