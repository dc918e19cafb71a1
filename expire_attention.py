"""Attention over an expiring memory (expire_span.py): every query of the block against
every key of ``[memory; block]``, weighted by ``attention.attention_weights`` with the
expire mask as its span mask and the positions where the mask is 0 left out of the softmax.

Dimension legend: B batch, M block length, C kept memories, T = C + M keys, H hidden,
K heads, D = H / K head dim, P position embeddings (--attn-span), N persistent vectors.

The logit of query j for key c at distance d = j - pos_c is ``(q.k + [1 <= d <= P] q.key_pe[P-d])
/ sqrt(D)``: position embeddings cover the P nearest distances (the paper: P = M), beyond
them content only. Kept memories need not be contiguous, so the product is dense (M x T)
and the distances come from each key's recorded position.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from attention import attention_weights, merge_heads, split_heads
from expire_span import ExpireSpan, distances
from persistent_memory import PersistentMemory


def position_logits(q: torch.Tensor, key_pe: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """q (B, K, M, D), key_pe (1, D, P), dist (B, M, T) -> q.key_pe[P-d] where 1 <= d <= P,
    else 0 (B, K, M, T)."""
    B, K, M, _ = q.shape
    P = key_pe.size(-1)
    near = (dist >= 1) & (dist <= P)  # (B, M, T)
    index = (P - dist).clamp(0, P - 1).long()  # (B, M, T)
    pe = torch.matmul(q, key_pe.unsqueeze(0))  # (B, K, M, P)
    picked = pe.gather(-1, index.unsqueeze(1).expand(B, K, M, index.size(-1)))  # (B, K, M, T)
    return picked * near.unsqueeze(1)  # (B, K, M, T)


def expire_attention(query: torch.Tensor, h_all: torch.Tensor, positions: torch.Tensor,
                     w_key: torch.Tensor, w_val: torch.Tensor, key_pe: torch.Tensor, nheads: int,
                     expire: ExpireSpan, pers: Optional[PersistentMemory], dropout: float,
                     training: bool) -> torch.Tensor:
    """query (B, M, H) projected, h_all (B, T, H) the memory's and the block's layer inputs,
    positions (B, T) each key's position from the block's first query -> (B, M, H)."""
    B, M, H = query.shape
    D = H // nheads
    q = split_heads(query, nheads)  # (B, K, M, D)
    k = split_heads(F.linear(h_all, w_key), nheads)  # (B, K, T, D)
    v = split_heads(F.linear(h_all, w_val), nheads)  # (B, K, T, D)
    dist = distances(positions, M)  # (B, M, T)
    logits = torch.matmul(q, k.transpose(-1, -2))  # (B, K, M, T)
    logits = logits + position_logits(q, key_pe, dist)  # (B, K, M, T)
    mask = expire.mask(h_all, dist).unsqueeze(1)  # (B, 1, M, T)
    pers_logits = pers.logits(q) if pers is not None else None  # (B, K, M, N)
    if logits.dtype in (torch.float16, torch.bfloat16):  # softmax and mask in float32
        logits = logits.float()  # (B, K, M, T)
        pers_logits = pers_logits.float() if pers_logits is not None else None  # (B, K, M, N)
    probs, pers_probs = attention_weights(logits, D, mask, pers_logits, mask == 0, dropout,
                                          training)  # (B, K, M, T), (B, K, M, N)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, K, M, D)
    if pers_probs is not None:
        out = out + pers.read(pers_probs)  # (B, K, M, D)
    return merge_heads(out)  # (B, M, H)
