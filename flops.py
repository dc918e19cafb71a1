"""Forward FLOPs per token of the model and of its attention, as the spans are learned.

Dimension legend: M block length, L max span, L' = L - trim_len (the reference's
trimmed span), W a head's window, H hidden, I feed-forward inner size, K heads,
D = H / K head dim, N persistent vectors, V vocabulary, d_i adaptive-I/O cluster
size, S_i words in cluster i, C tail clusters.

Conventions:
- one multiply-add is 2 FLOPs (the paper's Table 1 figures, e.g. 42M for the
  12-layer enwik8 model, look like one FLOP per multiply-add: halve ours to compare);
- forward pass only, per token (one query position); a training step costs about
  3x (the backward pass about twice the forward);
- only the matrix products are counted. Softmax, span mask and renormalisation,
  layer norms, biases, ReLU, dropout and residual additions cost O(H + W) per
  token and are ignored.

Per layer and token:
- projections Q, K, V, O: 4 * 2*H*H;
- context attention, per head k over its window W_k: content logits q.k 2*D*W_k,
  position logits q.key_pe 2*D*W_k, probabilities @ V 2*D*W_k;
- persistent memory, per head: logits 2*D*N and read 2*N*D;
- feed-forward (when present): 2 * 2*H*I.
Input: an embedding lookup is free; adaptive input costs its projection, 2*d_0*H,
counted for cluster 0 (where most tokens fall). Output: 2*H*V; the adaptive softmax
counts the head (projection 2*H*d_0 and logits 2*d_0*(S_0 + C)) and every tail
cluster (2*H*d_i + 2*d_i*S_i), i.e. the full distribution as ``log_prob`` computes
it (training evaluates a tail only for tokens whose target lies in it).

The windows are those of the attention path in use:
- ``grouped``: each head's own window, ``AdaptiveSpan.head_windows`` (the positions
  whose mask or its gradient is non-zero, rounded up to 64, within L'; the rule is
  ``adaptive_span.head_window``);
- ``reference``: L' for every head of the layer;
- ``max``: L for every head (a fixed span at the maximum).
With expire span (expire_attention.py) a query of the block scores every kept memory and
the block's earlier positions, C_l + (M - 1) / 2 keys on average over the block (C_l the
layer's memory length after the last training block), with position logits over
min(P, keys) of them (P = --attn-span); ``attn_max`` counts C_l = --attn-lim + ramp.
This is the useful work of the attention. The implementations do more: the
reference's dense content product scores M + L' keys per query and keeps L', the
grouped path's banded product scores chunk + W (and its cost model may score a head
over a wider window of a merged group, attention.plan_groups), and both re-project
the keys and values of the cached positions at every block. scripts/bench.py counts
that executed work.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

from adaptive_io import cluster_bounds, cluster_dims
from models import ModelConfig, TransformerSeq

WINDOW_KINDS = ("grouped", "reference", "max")


@dataclass
class Flops:
    """Forward FLOPs per token."""
    attn: float  # context attention over the windows of the path in use
    attn_max: float  # the same with every head at the max span L
    model: float  # the whole model with the windows of the path in use

    def metrics(self) -> dict:
        return {"flops/attn_flops": self.attn, "flops/attn_flops_max": self.attn_max,
                "flops/model_flops": self.model}

    def log_text(self) -> str:
        return (f"attn_flops/tok: {format_flops(self.attn)} (max {format_flops(self.attn_max)}) "
                f"model_flops/tok: {format_flops(self.model)}")


def format_flops(value: float) -> str:
    """Three significant digits with a k / M / G / T suffix: ``1.23M``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


# ---- windows --------------------------------------------------------------------
def layer_windows(model: TransformerSeq, kind: str = "") -> List[List[int]]:
    """Per layer, per head: the key positions a query scores. ``kind`` is one of
    WINDOW_KINDS; by default the model's attention path."""
    kind = kind or model.cfg.attn_impl
    if kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window kind {kind!r}; expected one of {WINDOW_KINDS}")
    L, K = model.cfg.attn_span, model.cfg.nheads
    out = []
    for layer in model.layers:
        span = layer.span
        if span is None or kind == "max":
            out.append([L] * K)
        elif kind == "reference":
            out.append([span.kept_len()] * K)
        else:
            out.append(span.head_windows())
    return out


# ---- counts ---------------------------------------------------------------------
def attention_flops(cfg: ModelConfig, windows: List[List[int]]) -> float:
    """Content logits, position logits and probabilities @ V over each head's window."""
    return float(sum(3 * 2 * cfg.head_dim * w for layer in windows for w in layer))


def layer_dense_flops(cfg: ModelConfig) -> float:
    """Per layer: the Q/K/V/O projections, persistent memory and feed-forward."""
    H = cfg.hidden_size
    total = 4 * 2 * H * H
    if cfg.pers_mem_size > 0:
        total += cfg.nheads * 2 * (2 * cfg.head_dim * cfg.pers_mem_size)
    if cfg.has_ff:
        total += 2 * 2 * H * cfg.inner_hidden_size
    return float(total)


def io_flops(cfg: ModelConfig) -> float:
    """Input projection (adaptive input only) and the output layer."""
    H, V = cfg.hidden_size, cfg.vocab_size
    if not cfg.adapt_io:
        return float(2 * H * V)
    bounds = cluster_bounds(V, cfg.adapt_io_cutoffs)
    ntail = len(bounds) - 2
    dims = cluster_dims(H, cfg.adapt_io_divval, ntail + 1)
    total = 2 * dims[0] * H  # adaptive input, cluster 0
    total += 2 * H * dims[0] + 2 * dims[0] * (bounds[1] + ntail)  # head
    for i in range(1, ntail + 1):
        total += 2 * H * dims[i] + 2 * dims[i] * (bounds[i + 1] - bounds[i])  # tail cluster i
    return float(total)


def expire_attention_flops(cfg: ModelConfig, memory: Sequence[float], block: int) -> float:
    """Per token, over the layers: the expire-span attention over ``memory[l]`` kept
    memories and the block's (M - 1) / 2 earlier positions on average."""
    keys = [c + (block - 1) / 2 for c in memory]
    return float(sum(cfg.nheads * 2 * cfg.head_dim * (2 * k + min(cfg.attn_span, k)) for k in keys))


def model_flops(cfg: ModelConfig, windows: List[List[int]]) -> float:
    return cfg.nlayers * layer_dense_flops(cfg) + attention_flops(cfg, windows) + io_flops(cfg)


def flops_per_token(model: TransformerSeq, memory: Optional[Sequence[int]] = None, block: int = 1) -> Flops:
    """The forward FLOPs per token of ``model`` with its current spans; with expire span,
    at ``memory`` kept memories per layer (the longest possible when None) for blocks of M."""
    cfg = model.cfg
    if cfg.expire_span:
        longest = [cfg.attn_lim + cfg.expire_span_ramp] * cfg.nlayers
        attn = expire_attention_flops(cfg, memory if memory is not None else longest, block)
        return Flops(attn=attn, attn_max=expire_attention_flops(cfg, longest, block),
                     model=cfg.nlayers * layer_dense_flops(cfg) + attn + io_flops(cfg))
    windows = layer_windows(model)
    return Flops(attn=attention_flops(cfg, windows),
                 attn_max=attention_flops(cfg, layer_windows(model, "max")),
                 model=model_flops(cfg, windows))
