"""Persistent memory vectors ("all-attention" layers), depending only on torch.

Every head of a layer owns N learned key/value vectors that all queries attend
to, jointly with the context (Sukhbaatar et al., 2019, "Augmenting
Self-attention with Persistent Memory"). They live in head space: no key/value
projection and no position term.

Dimension legend: B batch, M block length, L span, K heads, D head dim,
N persistent vectors.

Keys are stored as ``randn / sqrt(D)`` and used times ``sqrt(D)``, values are
stored as ``randn / sqrt(N)`` and used times ``sqrt(N)``: N(0, 1) at use, with
the re-parametrisation (and the names ``key``, ``val``) of the reference.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class PersistentMemory(nn.Module):
    def __init__(self, size: int, nheads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.size = size
        self.nheads = nheads
        self.head_dim = head_dim
        self.dropout = dropout
        self.key = nn.Parameter(torch.randn(nheads, head_dim, size) / math.sqrt(head_dim))  # (K, D, N)
        self.val = nn.Parameter(torch.randn(nheads, size, head_dim) / math.sqrt(size))  # (K, N, D)

    def logits(self, query: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Unscaled logits ``q . key`` for queries (B, K', M, D) of the heads ``heads``."""
        key = self.key[heads] * math.sqrt(self.head_dim)  # (K', D, N)
        return torch.matmul(query, key.unsqueeze(0))  # (B, K', M, N)

    def read(self, probs: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Dropout on the persistent probabilities (B, K', M, N), then their weighted values."""
        probs = F.dropout(probs, self.dropout, self.training)  # (B, K', M, N)
        val = self.val[heads] * math.sqrt(self.size)  # (K', N, D)
        return torch.matmul(probs, val.unsqueeze(0))  # (B, K', M, D)


def joint_softmax(context: torch.Tensor, persistent: torch.Tensor, head_dim: Optional[int]):
    """One softmax over context (…, L') and persistent (…, N) logits divided by sqrt(D)
    (``head_dim`` None: logits already divided)."""
    length = context.size(-1)
    logits = torch.cat([context, persistent], dim=-1)  # (…, L'+N)
    logits = logits / math.sqrt(head_dim) if head_dim is not None else logits  # (…, L'+N)
    probs = F.softmax(logits, dim=-1)  # (…, L'+N)
    return probs[..., :length], probs[..., length:]  # (…, L'), (…, N)


def joint_renormalise(context: torch.Tensor, persistent: torch.Tensor):
    """Renormalise masked context probabilities together with the persistent ones."""
    total = context.sum(-1, keepdim=True) + persistent.sum(-1, keepdim=True) + 1e-8  # (…, 1)
    return context / total, persistent / total  # (…, L'), (…, N)
