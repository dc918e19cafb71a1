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
"""
import math
from typing import Optional

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
