"""A drop-in causal self-attention with adaptive span, for models other than ours.

    from adaptive_span import AdaptiveSpanAttention
    attn = AdaptiveSpanAttention(hidden_size=H, nheads=K, max_span=L, ramp=32)
    y = attn(x, key_padding_mask=None)      # x (B, T, H) -> y (B, T, H)
    loss = task_loss + attn.span_loss()
    optimizer.step(); attn.clamp_spans()

Dimension legend: B batch, T sequence length, H hidden, K heads, D = H / K head dim,
L max span, R ramp, W a group's window, G heads of a group.

Query t attends to itself and the earlier positions, with no cache. At distance d = t - s
(0 = itself) head k's softmax weight is multiplied by ``m_k(d) = clamp((R + z_k - d) / R, 0, 1)``
and the weights are renormalised (``sum + 1e-8``), as in the paper; the logit has a learned
relative-position term ``q . key_pe[:, :, L-1-d]``. A static span is ``z_k = L * current_val[k]``;
a dynamic span (paper section 2.2) is ``z_{t,k} = L * sigmoid(v_k . x_t + b_k)`` per query.

A key outside the window ``d <= R + z`` has mask 0 and mask gradient 0, so each head scores only
its window (rounded up to 64 positions): heads sharing a window are scored together by the banded
products of attention.py, at a cost of (chunk + W) keys per query instead of T. Static windows
are the span module's cached integers (``AdaptiveSpan.head_windows``, recomputed once per
parameter update), not read per forward; a dynamic span needs one host sync per forward (the largest z of the block).

Padded keys (``key_padding_mask`` True, PyTorch's convention) get exactly zero weight, so the
outputs at real positions do not depend on what the padded positions hold. Outputs at padded
positions are finite but meaningless.
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptive_span import AdaptiveSpan, head_window
from attention import band_logits, band_read, plan_groups


def dynamic_reach(z_max: torch.Tensor, ramp: int, max_span: int) -> List[int]:
    """Per head, the distances d = 0..L-1 with ``R + z - d >= 0`` for the largest z (K,):
    ``min(L, floor(R + z) + 1)``. One host sync."""
    return (torch.floor(z_max.detach() + ramp) + 1).clamp(1, max_span).long().tolist()


def valid_band(key_padding_mask: Optional[torch.Tensor], B: int, T: int, W: int,
               device) -> torch.Tensor:
    """Which band entries are real keys: (B, 1, T, W), column j is distance W-1-j."""
    real = (torch.ones(B, T, dtype=torch.bool, device=device) if key_padding_mask is None
            else ~key_padding_mask.bool())  # (B, T)
    real = F.pad(real, (W - 1, 1), value=False)  # (B, W+T)
    return real.unfold(1, W, 1)[:, :T].unsqueeze(1)  # (B, 1, T, W)


class AdaptiveSpanAttention(nn.Module):
    """Multi-head causal self-attention whose heads learn their span (see the module doc)."""

    def __init__(self, hidden_size: int, nheads: int, max_span: int, ramp: int = 32,
                 init_val: float = 0.0, loss_coeff: float = 0.0, dynamic: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if hidden_size % nheads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by nheads {nheads}")
        self.nheads, self.head_dim, self.max_span = nheads, hidden_size // nheads, max_span
        self.ramp, self.loss_coeff, self.dynamic, self.dropout = ramp, loss_coeff, dynamic, dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key_pe = nn.Parameter(torch.randn(1, self.head_dim, max_span) / math.sqrt(self.head_dim))  # (1, D, L)
        self.span = AdaptiveSpan(max_span, nheads, ramp, init_val, loss_coeff)
        self.span_logit = None
        if dynamic:  # v_k (weight) and b_k (bias); v = 0 starts at the static span L*init_val
            self.span_logit = nn.Linear(hidden_size, nheads)
            frac = min(max(init_val, 1e-3), 1 - 1e-3)
            with torch.no_grad():
                self.span_logit.weight.zero_()
                self.span_logit.bias.fill_(math.log(frac / (1 - frac)))
        self._z = None  # dynamic: (B, T, K) spans of the last forward, padded positions excluded
        self._z_real = None  # dynamic: (B, T) real positions of the last forward

    # ---- spans -------------------------------------------------------------------
    def span_values(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic spans ``z = L * sigmoid(v . x + b)``: x (B, T, H) -> (B, T, K)."""
        return self.max_span * torch.sigmoid(self.span_logit(x))  # (B, T, K)

    def span_loss(self) -> torch.Tensor:
        """``loss_coeff`` times the mean span: over heads (static), or over heads and the real
        positions of the last forward (dynamic)."""
        if not self.dynamic:
            return self.span.loss()
        if self._z is None:
            return self.span_logit.bias.new_zeros(())
        real = self._z_real.unsqueeze(-1).to(self._z.dtype)  # (B, T, 1)
        mean = (self._z * real).sum() / (real.sum() * self.nheads).clamp(min=1)
        return self.loss_coeff * mean

    @torch.no_grad()
    def clamp_spans(self) -> None:
        """Keep the static spans in [0, L] (call after each optimizer step)."""
        self.span.clamp_param()

    def head_spans(self) -> List[int]:
        """Per head: positions with a non-zero mask (dynamic: at the largest z of the last
        forward, or at the bias-only span before any forward)."""
        if not self.dynamic:
            return self.span.head_spans()
        z = self.max_span * torch.sigmoid(self.span_logit.bias.detach()) if self._z is None \
            else self._z.detach().masked_fill(~self._z_real.unsqueeze(-1), 0).amax((0, 1))  # (K,)
        return (torch.ceil(z + self.ramp)).clamp(0, self.max_span).long().tolist()

    def span_stats(self) -> dict:
        """Average and maximum span over heads (and positions, dynamic), ramp included."""
        if not self.dynamic or self._z is None:
            spans = self.head_spans()
            return {"avg": sum(spans) / len(spans), "max": max(spans)}
        real = self._z_real.unsqueeze(-1).expand_as(self._z)  # (B, T, K)
        z = self._z.detach()[real] + self.ramp  # (n,)
        return {"avg": float(z.clamp(max=self.max_span).mean()), "max": float(z.max().clamp(max=self.max_span))}

    # ---- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, H = x.shape
        K, D, L = self.nheads, self.head_dim, self.max_span
        q, k, v = self.qkv(x).view(B, T, 3, K, D).permute(2, 0, 3, 1, 4)  # 3 x (B, K, T, D)
        z = None
        if self.dynamic:
            z = self.span_values(x)  # (B, T, K)
            real = (torch.ones(B, T, dtype=torch.bool, device=x.device) if key_padding_mask is None
                    else ~key_padding_mask.bool())  # (B, T)
            self._z, self._z_real = z, real
            z_max = z.detach().masked_fill(~real.unsqueeze(-1), 0).amax((0, 1))  # (K,)
            windows = [head_window(r, L) for r in dynamic_reach(z_max, self.ramp, L)]
        else:
            windows = self.span.head_windows()  # cached, recomputed once per update
        longest = head_window(T, L)  # no window needs more than the sequence
        groups, _ = plan_groups(tuple(min(w, longest) for w in windows), B, T, D)
        out = q.new_empty(B, K, T, D)  # (B, K, T, D)
        for W, chunk, heads in groups:
            idx = heads if isinstance(heads, slice) else torch.tensor(heads, device=x.device)
            zg = z[:, :, idx].transpose(1, 2).unsqueeze(-1) if z is not None else None  # (B, G, T, 1)
            out[:, idx] = self._group(q[:, idx], k[:, idx], v[:, idx], W, chunk, idx, zg,
                                      key_padding_mask)  # (B, G, T, D)
        return self.out(out.transpose(1, 2).reshape(B, T, H))  # (B, T, H)

    def _group(self, q, k, v, W: int, chunk: int, heads, z: Optional[torch.Tensor],
               key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention of G heads over their last W positions: q, k, v (B, G, T, D),
        z (B, G, T, 1) or None -> (B, G, T, D)."""
        B, G, T, D = q.shape
        L, R = self.max_span, self.ramp
        k = F.pad(k, (0, 0, W - 1, 1))  # (B, G, W+T, D): query t sees rows t..t+W-1
        v = F.pad(v, (0, 0, W - 1, 1))  # (B, G, W+T, D)
        logits = band_logits(q, k, chunk)  # (B, G, T, W)
        logits = logits + torch.matmul(q, self.key_pe[:, :, L - W:].unsqueeze(0))  # (B, G, T, W)
        logits = logits / math.sqrt(D)  # (B, G, T, W)
        valid = valid_band(key_padding_mask, B, T, W, q.device)  # (B, 1, T, W)
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)  # (B, G, T, W)
        probs = F.softmax(logits, dim=-1)  # (B, G, T, W)
        if z is None:
            mask = self.span.mask(W)[heads]  # (G, 1, W)
        else:
            dist = torch.arange(W - 1, -1, -1, device=q.device, dtype=z.dtype)  # (W,) farthest first
            mask = ((R + z - dist) / R).clamp(0, 1)  # (B, G, T, W)
        probs = probs * mask  # (B, G, T, W)
        probs = probs / (probs.sum(-1, keepdim=True) + 1e-8)  # (B, G, T, W)
        probs = F.dropout(probs, self.dropout, self.training)  # (B, G, T, W)
        return band_read(probs, v, chunk)  # (B, G, T, D)
