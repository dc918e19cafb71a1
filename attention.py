"""Cached relative-position attention with adaptive span and persistent memory.

Dimension legend: B batch, M block length, L max span, L' kept span (after
trimming), C cached positions, H hidden, K heads, D = H / K head dim,
N persistent vectors.

Each query attends to exactly the L previous positions (never to itself) of
``[cache; block]``. The logit for distance d = 1..L is
``(q_i . k_{i-d} + q_i . key_pe[:, :, L-d]) / sqrt(D)``; with adaptive span the
softmax is multiplied by the span mask and renormalised (``sum + 1e-8``).

``reference_attention`` computes exactly what the published reference does
(every head trimmed to the layer's longest span, rounded to 64, and a dense
M x (M + L') content product unskewed into M x L').

``grouped_attention`` computes the same function (up to float rounding and the
1e-8 term) at a cost that follows each head's learned span: heads are grouped
by their window W (the span rounded up to 64), and each group projects keys and
values for its last W + M positions only, with its own rows of the projection
weights, and scores them in query chunks against their own band of W keys.
"""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from adaptive_span import AdaptiveSpan
from persistent_memory import PersistentMemory, joint_renormalise, joint_softmax


def split_heads(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """(B, T, H) -> (B, K, T, D)."""
    B, T, H = x.shape
    return x.view(B, T, nheads, H // nheads).transpose(1, 2)  # (B, K, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, K, M, D) -> (B, M, H)."""
    B, K, M, D = x.shape
    return x.transpose(1, 2).reshape(B, M, K * D)  # (B, M, H)


def unskew(x: torch.Tensor) -> torch.Tensor:
    """(…, M, M+L) -> (…, M, L): row i keeps columns i .. i+L-1."""
    *lead, M, ML = x.shape
    L = ML - M
    x = x.reshape(*lead, M * ML)  # (…, M*(M+L))
    x = F.pad(x, (0, M))  # (…, M*(M+L+1))
    x = x.view(*lead, M, ML + 1)  # (…, M, M+L+1)
    return x[..., :L]  # (…, M, L)


def skew(x: torch.Tensor) -> torch.Tensor:
    """(…, M, L) -> (…, M, M+L): row i is placed at columns i .. i+L-1, zeros elsewhere."""
    *lead, M, L = x.shape
    x = F.pad(x, (0, M + 1))  # (…, M, L+M+1)
    x = x.reshape(*lead, M * (L + M + 1))  # (…, M*(L+M+1))
    x = x[..., :-M]  # (…, M*(L+M))
    return x.view(*lead, M, L + M)  # (…, M, M+L)


def fit_memory(h_all: torch.Tensor, block: int, keep: int) -> torch.Tensor:
    """Keep the ``keep`` positions before the block: cut the oldest, or left-pad zeros."""
    cached = h_all.size(1) - block
    if cached > keep:
        return h_all[:, cached - keep:]  # (B, keep+M, H)
    if cached < keep:
        return F.pad(h_all, (0, 0, keep - cached, 0))  # (B, keep+M, H)
    return h_all


def attend(ctx_logits: torch.Tensor, span_mask: Optional[torch.Tensor],
           pers: Optional[PersistentMemory], pers_logits: Optional[torch.Tensor],
           head_dim: int, dropout: float, training: bool, heads: slice = slice(None)):
    """Softmax, span mask, renormalisation and dropout of context logits (B, K', M, L').

    Returns the context probabilities (B, K', M, L') after dropout and the
    persistent read-out (B, K', M, D) or None. ``span_mask`` is (K', 1, L').
    """
    if pers is None:
        probs = F.softmax(ctx_logits / math.sqrt(head_dim), dim=-1)  # (B, K', M, L')
        if span_mask is not None:
            probs = probs * span_mask  # (B, K', M, L')
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-8)  # (B, K', M, L')
        return F.dropout(probs, dropout, training), None
    probs, pers_probs = joint_softmax(ctx_logits, pers_logits, head_dim)  # (B,K',M,L'), (B,K',M,N)
    if span_mask is not None:
        probs = probs * span_mask  # (B, K', M, L')
        probs, pers_probs = joint_renormalise(probs, pers_probs)  # (B,K',M,L'), (B,K',M,N)
    probs = F.dropout(probs, dropout, training)  # (B, K', M, L')
    return probs, pers.read(pers_probs, heads)  # (B, K', M, L'), (B, K', M, D)


def reference_attention(query: torch.Tensor, h_all: torch.Tensor, w_key: torch.Tensor,
                        w_val: torch.Tensor, key_pe: torch.Tensor, nheads: int,
                        span: Optional[AdaptiveSpan], pers: Optional[PersistentMemory],
                        dropout: float, training: bool) -> torch.Tensor:
    """The reference computation. query (B, M, H) projected, h_all (B, C+M, H) -> (B, M, H)."""
    B, M, H = query.shape
    L = key_pe.size(-1)
    D = H // nheads
    trim = span.trim_len() if span is not None else 0
    key = F.linear(h_all, w_key)  # (B, C+M, H)
    val = F.linear(h_all, w_val)  # (B, C+M, H)
    key = fit_memory(key, M, L - trim)  # (B, L'+M, H)
    val = fit_memory(val, M, L - trim)  # (B, L'+M, H)
    q = split_heads(query, nheads)  # (B, K, M, D)
    k = split_heads(key, nheads)  # (B, K, L'+M, D)
    v = split_heads(val, nheads)  # (B, K, L'+M, D)
    pe = key_pe[:, :, trim:]  # (1, D, L')
    logits = unskew(torch.matmul(q, k.transpose(-1, -2)))  # (B, K, M, L')
    logits = logits + torch.matmul(q, pe.unsqueeze(0))  # (B, K, M, L')
    mask = span.mask(L - trim) if span is not None else None  # (K, 1, L')
    pers_logits = pers.logits(q) if pers is not None else None  # (B, K, M, N)
    probs, pers_out = attend(logits, mask, pers, pers_logits, D, dropout, training)
    out = torch.matmul(skew(probs), v)  # (B, K, M, D)
    if pers_out is not None:
        out = out + pers_out  # (B, K, M, D)
    return merge_heads(out)  # (B, M, H)


# ---- grouped attention: the cost follows each head's span ----------------------
BUCKET = 64  # head windows are rounded up to a multiple of this many positions


def kept_length(span: Optional[AdaptiveSpan], max_span: int) -> int:
    """L', the positions the reference keeps after trimming (a host sync)."""
    return max_span - span.trim_len() if span is not None else max_span


def head_windows(span: Optional[AdaptiveSpan], nheads: int, max_span: int,
                 keep: Optional[int] = None) -> List[int]:
    """Positions each head must see: every position whose span mask *or its gradient*
    is non-zero (the clamp passes gradient at exactly 0), rounded up to ``BUCKET`` and
    kept within the reference's trimmed length L' (``keep``). One host sync per call."""
    keep = kept_length(span, max_span) if keep is None else keep
    if span is None:
        return [keep] * nheads
    return [min(keep, max(BUCKET, -(-r // BUCKET) * BUCKET)) for r in span.reach()]


def group_heads(windows: List[int]):
    """[(window, heads)] sorted by window; ``heads`` is a slice when contiguous, else a
    list of head indices. Also returns the head order of the concatenated groups."""
    groups = {}
    for head, window in enumerate(windows):
        groups.setdefault(window, []).append(head)
    out, order = [], []
    for window in sorted(groups):
        heads = groups[window]
        order.extend(heads)
        if heads == list(range(heads[0], heads[-1] + 1)):
            out.append((window, slice(heads[0], heads[-1] + 1)))
        else:
            out.append((window, heads))
    return out, order


def chunk_size(block: int, window: int) -> int:
    """Queries per chunk of the banded product: about the window, at least 64, at most M."""
    return min(block, max(BUCKET, window))


def band_logits(q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    """Content logits of the band: q (B, G, M, D), k (B, G, W+M, D) -> (B, G, M, W),
    where query i sees key rows i .. i+W-1. Chunks of ``chunk`` queries each multiply
    against their own c+W rows only (c = M is the dense skew/unskew product)."""
    B, G, M, D = q.shape
    W = k.size(2) - M
    if chunk >= M:
        return unskew(torch.matmul(q, k.transpose(-1, -2)))  # (B, G, M, W)
    n = -(-M // chunk)
    pad = n * chunk - M
    q = F.pad(q, (0, 0, 0, pad)).view(B, G, n, chunk, D)  # (B, G, n, c, D)
    k = F.pad(k, (0, 0, 0, pad)).unfold(2, chunk + W, chunk)  # (B, G, n, D, c+W)
    logits = unskew(torch.matmul(q, k))  # (B, G, n, c, W)
    return logits.reshape(B, G, n * chunk, W)[:, :, :M]  # (B, G, M, W)


def band_read(probs: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Weighted values of the band: probs (B, G, M, W), v (B, G, W+M, D) -> (B, G, M, D)."""
    B, G, M, W = probs.shape
    D = v.size(-1)
    if chunk >= M:
        return torch.matmul(skew(probs), v)  # (B, G, M, D)
    n = -(-M // chunk)
    pad = n * chunk - M
    probs = F.pad(probs, (0, 0, 0, pad)).view(B, G, n, chunk, W)  # (B, G, n, c, W)
    v = F.pad(v, (0, 0, 0, pad)).unfold(2, chunk + W, chunk)  # (B, G, n, D, c+W)
    out = torch.matmul(skew(probs), v.transpose(-1, -2))  # (B, G, n, c, D)
    return out.reshape(B, G, n * chunk, D)[:, :, :M]  # (B, G, M, D)


def _select(x: torch.Tensor, heads, dim: int) -> torch.Tensor:
    """Heads ``heads`` (slice or index list) of ``x`` along ``dim``."""
    if isinstance(heads, slice):
        return x[(slice(None),) * dim + (heads,)]
    index = torch.tensor(heads, device=x.device)  # (G,)
    return x.index_select(dim, index)


def _pick(heads):
    """Head selector for PersistentMemory: the slice, or an index tensor."""
    return heads if isinstance(heads, slice) else torch.tensor(heads)


def _group_attention(q: torch.Tensor, h: torch.Tensor, w_key: torch.Tensor,
                     w_val: torch.Tensor, pe: torch.Tensor, mask: Optional[torch.Tensor],
                     pers: Optional[PersistentMemory], heads, dropout: float,
                     training: bool) -> torch.Tensor:
    """Attention of G heads over their window W: q (B, G, M, D), h (B, W+M, H), w_key and
    w_val (G*D, H), pe (1, D, W), mask (G, 1, W) or None -> (B, G, M, D)."""
    G, M, D = q.size(1), q.size(2), q.size(3)
    window = pe.size(-1)
    k = split_heads(F.linear(h, w_key), G)  # (B, G, W+M, D)
    v = split_heads(F.linear(h, w_val), G)  # (B, G, W+M, D)
    chunk = chunk_size(M, window)
    logits = band_logits(q, k, chunk)  # (B, G, M, W)
    logits = logits + torch.matmul(q, pe.unsqueeze(0))  # (B, G, M, W)
    pers_logits = pers.logits(q, _pick(heads)) if pers is not None else None  # (B, G, M, N)
    if logits.dtype in (torch.float16, torch.bfloat16) and (
            pers is None or torch.is_autocast_enabled(logits.device.type)):
        logits = logits.float()  # (B, G, M, W): softmax and mask in float32
        pers_logits = pers_logits.float() if pers_logits is not None else None  # (B, G, M, N)
    probs, pers_out = attend(logits, mask, pers, pers_logits, D, dropout, training, _pick(heads))
    out = band_read(probs.to(v.dtype), v, chunk)  # (B, G, M, D)
    return out + pers_out if pers_out is not None else out  # (B, G, M, D)


def grouped_attention(query: torch.Tensor, h_all: torch.Tensor, w_key: torch.Tensor,
                      w_val: torch.Tensor, key_pe: torch.Tensor, nheads: int,
                      span: Optional[AdaptiveSpan], pers: Optional[PersistentMemory],
                      dropout: float, training: bool) -> torch.Tensor:
    """The function of ``reference_attention`` (up to the 1e-8 term) at a cost that
    follows each head's span: heads sharing a window W are projected, scored and
    read over their own W positions only (when every head needs the whole kept span
    L', this is the reference computation itself). query (B, M, H), h_all (B, C+M, H)
    -> (B, M, H)."""
    B, M, H = query.shape
    L = key_pe.size(-1)
    K, D = nheads, H // nheads
    keep = kept_length(span, L)
    groups, order = group_heads(head_windows(span, K, L, keep))
    if len(groups) == 1 and groups[0][0] == keep:  # every head needs all of L': nothing to save
        return reference_attention(query, h_all, w_key, w_val, key_pe, nheads, span, pers,
                                   dropout, training)
    q_all = split_heads(query, K)  # (B, K, M, D)
    wk = w_key.view(K, D, H)  # (K, D, H)
    wv = w_val.view(K, D, H)  # (K, D, H)
    mask_all = span.mask(L) if span is not None else None  # (K, 1, L)
    # widest group first; each narrower window is cut from the previous one, so that the
    # backward pass fills full-length (L+M) gradient buffers once, not once per group
    h = fit_memory(h_all, M, groups[-1][0])  # (B, W+M, H)
    pe, outs = key_pe[:, :, L - groups[-1][0]:], []  # (1, D, W)
    for window, heads in reversed(groups):
        h = h[:, h.size(1) - M - window:]  # (B, W+M, H)
        pe = pe[:, :, pe.size(-1) - window:]  # (1, D, W)
        G = wk[heads].size(0) if isinstance(heads, slice) else len(heads)
        mask = None
        if mask_all is not None:
            mask = _select(mask_all, heads, 0)[:, :, L - window:]  # (G, 1, W)
        outs.append(_group_attention(_select(q_all, heads, 1), h,
                                     _select(wk, heads, 0).reshape(G * D, H),
                                     _select(wv, heads, 0).reshape(G * D, H), pe, mask, pers,
                                     heads, dropout, training))  # (B, G, M, D)
    out = torch.cat(outs[::-1], dim=1) if len(outs) > 1 else outs[0]  # (B, K, M, D) in group order
    if order != list(range(K)):
        inverse = sorted(range(K), key=order.__getitem__)
        out = out.index_select(1, torch.tensor(inverse, device=out.device))  # (B, K, M, D)
    return merge_heads(out)  # (B, M, H)
