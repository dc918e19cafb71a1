"""Adaptive attention span (Sukhbaatar et al., 2019), depending only on torch.

Each head k learns z_k = current_val[k] * L, and the attention weight at
distance d (x = d - 1) is multiplied by the soft mask

    m_z(x) = clamp((R + z - x) / R, 0, 1)

after the softmax, then renormalised. An L1 penalty on z shrinks the spans and
keys farther than the longest span can be dropped ("trimmed").

Dimension legend: B batch, M block length, L max span, K heads, D head dim.
Positions of a span window are ordered from farthest (index 0) to nearest.

The state-dict names (``_mask.current_val``, ``_mask.mask_template``) are those
of the reference implementation so its checkpoints load unchanged.
"""
import math

import torch
import torch.nn as nn

TRIM_GRANULARITY = 64  # the reference trims memory in multiples of 64 positions


class AdaptiveMask(nn.Module):
    """The soft mask ``clamp((template + z) / R + 1, 0, 1)`` over L positions."""

    def __init__(self, max_size: int, ramp_size: int, init_val: float, nheads: int):
        super().__init__()
        self.max_size = max_size
        self.ramp_size = ramp_size
        self.current_val = nn.Parameter(torch.full((nheads, 1, 1), float(init_val)))  # (K, 1, 1)
        self.register_buffer("mask_template", torch.linspace(1 - max_size, 0, steps=max_size))  # (L,)

    def values(self, length: int) -> torch.Tensor:
        """The mask of the ``length`` nearest positions, right-aligned."""
        mask = self.mask_template + self.current_val * self.max_size  # (K, 1, L)
        mask = mask / self.ramp_size + 1  # (K, 1, L)
        mask = mask.clamp(0, 1)  # (K, 1, L)
        if length < self.max_size:
            mask = mask[:, :, -length:]  # (K, 1, length)
        return mask


class AdaptiveSpan(nn.Module):
    """Span mask, span loss, trimming and cache-size rules of one attention layer."""

    def __init__(self, attn_span: int, nheads: int, ramp: int = 32, init_val: float = 0.0,
                 loss_coeff: float = 0.0, adapt_cache: bool = False):
        super().__init__()
        self.attn_span = attn_span
        self.nheads = nheads
        self.ramp = ramp
        self.loss_coeff = loss_coeff
        self.adapt_cache = adapt_cache
        self._mask = AdaptiveMask(attn_span, ramp, init_val, nheads)

    @property
    def current_val(self) -> nn.Parameter:
        return self._mask.current_val  # (K, 1, 1)

    def mask(self, length: int) -> torch.Tensor:
        """Mask of the ``length`` nearest positions for every head."""
        return self._mask.values(length)  # (K, 1, length)

    def mask_probs(self, attn: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mask attention probabilities of shape (B, K, M, L') right-aligned, then renormalise."""
        attn = attn * self.mask(attn.size(-1))  # (B, K, M, L')
        if normalize:
            attn = attn / (attn.sum(-1, keepdim=True) + 1e-8)  # (B, K, M, L')
        return attn

    # ---- spans -------------------------------------------------------------
    def head_spans(self) -> list:
        """Positions with a non-zero mask, per head: ``clamp(ceil(z) + R, 0, L)``."""
        z = self.current_val.detach().view(-1).float() * self.attn_span  # (K,)
        spans = (torch.ceil(z) + self.ramp).clamp(0, self.attn_span)  # (K,)
        return [int(s) for s in spans.tolist()]

    def reach(self) -> list:
        """Per head: positions whose mask *or its gradient* is non-zero (the clamp passes
        gradient at exactly 0), i.e. where the unclamped mask is >= 0. One host sync."""
        m = self._mask
        raw = (m.mask_template + m.current_val.detach() * m.max_size) / m.ramp_size + 1  # (K, 1, L)
        return (raw >= 0).sum(-1).view(-1).tolist()  # K ints

    def max_span(self) -> int:
        z = self.current_val.detach().max().item() * self.attn_span
        return int(min(max(math.ceil(z) + self.ramp, 0), self.attn_span))

    def avg_span(self) -> float:
        z = self.current_val.detach().mean().item() * self.attn_span
        return float(min(max(math.ceil(z) + self.ramp, 0), self.attn_span))

    def trim_len(self) -> int:
        """How many of the farthest positions the reference drops (a multiple of 64)."""
        trim = min(self.attn_span - 1, self.attn_span - self.max_span())
        return trim // TRIM_GRANULARITY * TRIM_GRANULARITY

    def cache_size(self) -> int:
        """Hidden states to keep between blocks: L, or the learned span + 64."""
        if not self.adapt_cache:
            return self.attn_span
        return min(self.attn_span, self.attn_span - self.trim_len() + TRIM_GRANULARITY)

    # ---- training hooks ----------------------------------------------------
    def loss(self) -> torch.Tensor:
        """L1 span penalty ``lambda * L * mean_heads(current_val)``."""
        return self.loss_coeff * self.attn_span * self.current_val.mean()

    @torch.no_grad()
    def clamp_param(self) -> None:
        self.current_val.clamp_(0, 1)


def __getattr__(name: str):
    """``from adaptive_span import AdaptiveSpanAttention``: the drop-in attention module lives
    in span_attention.py (it scores with attention.py's banded products), imported on demand so
    that attention.py can import this file."""
    if name == "AdaptiveSpanAttention":
        from span_attention import AdaptiveSpanAttention
        return AdaptiveSpanAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
