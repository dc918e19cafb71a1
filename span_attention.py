"""A drop-in causal self-attention with adaptive span, for models other than ours.

    from span_attention import AdaptiveSpanAttention
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
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptive_span import AdaptiveSpan, DynamicSpan, head_window
from attention import attention_weights, band_logits, band_read, outside_windows, plan_groups


def valid_band(key_padding_mask: Optional[torch.Tensor], B: int, T: int, W: int,
               device) -> torch.Tensor:
    """Which band entries are real keys: (B, 1, T, W), column j is distance W-1-j."""
    real = (torch.ones(B, T, dtype=torch.bool, device=device) if key_padding_mask is None
            else ~key_padding_mask.bool())  # (B, T)
    real = F.pad(real, (W - 1, 1), value=False)  # (B, W+T)
    return real.unfold(1, W, 1)[:, :T].unsqueeze(1)  # (B, 1, T, W)


class AdaptiveSpanAttention(nn.Module):
    """Multi-head causal self-attention whose heads learn their span (see the module doc).
    The span rules are those of the language model: ``AdaptiveSpan`` (static) or
    ``DynamicSpan`` (dynamic), whose distance 0 is here the query itself."""

    def __init__(self, hidden_size: int, nheads: int, max_span: int, ramp: int = 32,
                 init_val: float = 0.0, loss_coeff: float = 0.0, dynamic: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if hidden_size % nheads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by nheads {nheads}")
        self.nheads, self.head_dim, self.max_span = nheads, hidden_size // nheads, max_span
        self.ramp, self.dynamic, self.dropout = ramp, dynamic, dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key_pe = nn.Parameter(torch.randn(1, self.head_dim, max_span) / math.sqrt(self.head_dim))  # (1, D, L)
        self.span = (DynamicSpan(max_span, nheads, hidden_size, ramp, init_val, loss_coeff) if dynamic
                     else AdaptiveSpan(max_span, nheads, ramp, init_val, loss_coeff))

    # ---- spans -------------------------------------------------------------------
    def span_loss(self) -> torch.Tensor:
        """``loss_coeff`` times the mean span: over heads (static), or over heads and the real
        positions of the last forward (dynamic)."""
        return self.span.loss()

    @torch.no_grad()
    def clamp_spans(self) -> None:
        """Keep the static spans in [0, L] (call after each optimizer step)."""
        self.span.clamp_param()

    def head_spans(self) -> list:
        """Per head: positions with a non-zero mask (dynamic: at the largest span of the last
        forward, or at the bias-only span before any forward)."""
        return self.span.head_spans()

    def span_stats(self) -> dict:
        """The reference's average and maximum span (dynamic: over the last forward's positions)."""
        return {"avg": self.span.avg_span(), "max": self.span.max_span()}

    # ---- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, H = x.shape
        K, D, L = self.nheads, self.head_dim, self.max_span
        q, k, v = self.qkv(x).view(B, T, 3, K, D).permute(2, 0, 3, 1, 4)  # 3 x (B, K, T, D)
        if self.dynamic:  # the spans of this input (one host sync)
            real = None if key_padding_mask is None else ~key_padding_mask.bool()  # (B, T)
            windows = self.span.observe(x, real).windows
        else:
            windows = self.span.head_windows()  # cached, recomputed once per update
        longest = head_window(T, L)  # no window needs more than the sequence
        windows = tuple(min(w, longest) for w in windows)
        groups, _ = plan_groups(windows, B, T, D)
        out = q.new_empty(B, K, T, D)  # (B, K, T, D)
        for W, chunk, heads in groups:
            idx = heads if isinstance(heads, slice) else torch.tensor(heads, device=x.device)
            mask = self.span.mask(W)  # (K, 1, W), or (B, K, T, W) dynamic
            mask = mask[:, idx] if self.dynamic else mask[idx]  # (G, 1, W) or (B, G, T, W)
            own = windows[heads] if isinstance(heads, slice) else [windows[j] for j in heads]
            out[:, idx] = self._group(q[:, idx], k[:, idx], v[:, idx], W, chunk, mask,
                                      key_padding_mask, outside_windows(own, W, x.device))  # (B, G, T, D)
        return self.out(out.transpose(1, 2).reshape(B, T, H))  # (B, T, H)

    def _group(self, q, k, v, W: int, chunk: int, mask: torch.Tensor,
               key_padding_mask: Optional[torch.Tensor],
               outside: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention of G heads over their last W positions: q, k, v (B, G, T, D), span mask
        (G, 1, W) or (B, G, T, W), ``outside`` (G, 1, W) the columns beyond a head's own
        window or None -> (B, G, T, D)."""
        B, G, T, D = q.shape
        k = F.pad(k, (0, 0, W - 1, 1))  # (B, G, W+T, D): query t sees rows t..t+W-1
        v = F.pad(v, (0, 0, W - 1, 1))  # (B, G, W+T, D)
        logits = band_logits(q, k, chunk)  # (B, G, T, W)
        logits = logits + torch.matmul(q, self.key_pe[:, :, self.max_span - W:].unsqueeze(0))  # (B, G, T, W)
        unseen = ~valid_band(key_padding_mask, B, T, W, q.device)  # (B, 1, T, W)
        unseen = unseen if outside is None else unseen | outside  # (B, G, T, W)
        probs, _ = attention_weights(logits, D, mask, None, unseen, self.dropout, self.training)  # (B, G, T, W)
        return band_read(probs, v, chunk)  # (B, G, T, D)
