"""Expire-span (Sukhbaatar et al., ICML 2021, "Not All Memories are Created Equal"): each
memory learns how long it stays.

Dimension legend: B batch, M block length, C kept memories, T = C + M keys, H hidden.

A key's position is counted from the block's first query: a memory that entered ``a``
positions before it sits at ``-a``, the block's own states at 0 .. M-1; query j sees key c at
distance d = j - pos_c, and only d >= 1 (the future and the position itself are masked).

- span: ``e = L sigmoid(w.h / s + b)``, L the attention limit, s the pre-division; w starts
  at 0 and b at logit(p), so that every span starts at p L.
- mask: ``m = clamp((e - d) / R + 1, 0, 1)``, R the ramp.
- loss: ``coef * sum over pairs with 0 < m < 1 of (e - d) / (R M)`` (every row of the batch).
- drop: after a block, a memory with ``e + R <= `` its distance to the next block's first query
  has a zero mask for every later query; each stream drops the batch's smallest count of those,
  rounded down to a multiple of M, most expired first; the block's own states stay.

A layer's memory is one tensor (B, C, H + 2): the hidden states, their spans (detached, as of
the block that kept them) and their age a (the distance to the next block's first query), so
that the trainer, the checkpoint and the resharding treat it as any cache.
"""
import math
from typing import List, Tuple

import torch
import torch.nn as nn


def unpack(memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, H+2) -> hidden (B, C, H), spans (B, C), ages (B, C)."""
    return memory[..., :-2], memory[..., -2], memory[..., -1]


def pack(hidden: torch.Tensor, spans: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
    """hidden (B, C, H), spans (B, C), ages (B, C) -> (B, C, H+2)."""
    return torch.cat([hidden, spans.unsqueeze(-1).to(hidden.dtype),
                      ages.unsqueeze(-1).to(hidden.dtype)], dim=-1)  # (B, C, H+2)


def key_positions(ages: torch.Tensor, block: int) -> torch.Tensor:
    """Memory ages (B, C) -> positions of [memory; block] from the block's first query (B, C+M)."""
    own = torch.arange(block, device=ages.device, dtype=ages.dtype).expand(ages.size(0), block)  # (B, M)
    return torch.cat([-ages, own], dim=1)  # (B, C+M)


def distances(positions: torch.Tensor, block: int) -> torch.Tensor:
    """Key positions (B, T) -> distance of every query to every key (B, M, T)."""
    queries = torch.arange(block, device=positions.device, dtype=positions.dtype)  # (M,)
    return queries.view(1, -1, 1) - positions.unsqueeze(1)  # (B, M, T)


def expire_mask(spans: torch.Tensor, dist: torch.Tensor, ramp: int) -> torch.Tensor:
    """spans (B, T), dist (B, M, T) -> the soft mask (B, M, T), 0 for d < 1 (causal)."""
    mask = ((spans.unsqueeze(1) - dist) / ramp + 1).clamp(0, 1)  # (B, M, T)
    return mask.masked_fill(dist < 1, 0)  # (B, M, T)


def expire_loss(spans: torch.Tensor, dist: torch.Tensor, mask: torch.Tensor, ramp: int,
                coef: float) -> torch.Tensor:
    """coef * sum over the pairs inside the ramp (0 < m < 1) of (e - d), / (R M)."""
    inside = (mask > 0) & (mask < 1)  # (B, M, T)
    remaining = (spans.unsqueeze(1) - dist) * inside  # (B, M, T)
    return coef * remaining.sum() / (ramp * dist.size(1))


def droppable(spans: torch.Tensor, next_ages: torch.Tensor, block: int, ramp: int) -> torch.Tensor:
    """(B, T) bool: memories (not the block's own M states) whose mask is 0 for every later
    query: ``e + R <= a``, a the distance to the next block's first query."""
    expired = spans + ramp <= next_ages  # (B, T)
    expired[:, expired.size(1) - block:] = False
    return expired


def drop_count(expired: torch.Tensor, block: int) -> int:
    """The batch's smallest count of droppable memories, rounded down to a multiple of M
    (one host sync)."""
    if expired.size(1) == block:
        return 0
    smallest = int(expired.sum(1).min().item())
    return smallest // block * block


def keep_indices(spans: torch.Tensor, next_ages: torch.Tensor, expired: torch.Tensor,
                 count: int) -> torch.Tensor:
    """(B, T - count) indices, in time order, of what each stream keeps after dropping its
    ``count`` most expired droppable memories (smallest e + R - a first)."""
    left = (spans - next_ages).masked_fill(~expired, math.inf)  # (B, T)
    order = torch.argsort(left, dim=1, stable=True)  # (B, T)
    return torch.sort(order[:, count:], dim=1).values  # (B, T-count)


class ExpireSpan(nn.Module):
    """The span predictor of one layer, its mask, loss and memory update."""

    def __init__(self, hidden_size: int, attn_lim: int, ramp: int, pre_div: float,
                 init_percentage: float, loss_coef: float, noisy: bool = False):
        super().__init__()
        self.attn_lim, self.ramp, self.pre_div = attn_lim, ramp, pre_div
        self.loss_coef, self.noisy = loss_coef, noisy
        self.span_predictor = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.span_predictor.weight)
        p = min(max(init_percentage, 1e-6), 1 - 1e-6)
        nn.init.constant_(self.span_predictor.bias, math.log(p / (1 - p)))
        self.last_loss = None  # the auxiliary loss of the last training forward (with its graph)

    def spans(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> e (B, T), in [0, L]."""
        logit = self.span_predictor(hidden / self.pre_div).squeeze(-1)  # (B, T)
        return self.attn_lim * torch.sigmoid(logit)  # (B, T)

    def noisy_spans(self, spans: torch.Tensor) -> torch.Tensor:
        """--expire-span-noisy in training: spans clamped to a random fraction of L per block."""
        if not (self.noisy and self.training):
            return spans
        limit = torch.rand((), device=spans.device) * self.attn_lim  # ()
        return torch.minimum(spans, limit)  # (B, T)

    def mask(self, hidden: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """The layer's mask (B, M, T) over [memory; block] (hidden (B, T, H), ``distances``
        (B, M, T)); keeps the auxiliary loss of a training forward in ``last_loss``."""
        spans = self.noisy_spans(self.spans(hidden))  # (B, T)
        mask = expire_mask(spans, dist, self.ramp)  # (B, M, T)
        if self.training and self.loss_coef > 0:
            self.last_loss = expire_loss(spans, dist, mask, self.ramp, self.loss_coef)
        return mask

    def loss(self) -> torch.Tensor:
        """The last training forward's auxiliary loss (taken once), or 0."""
        loss, self.last_loss = self.last_loss, None
        return loss if loss is not None else self.span_predictor.bias.new_zeros(())

    @torch.no_grad()
    def next_memory(self, memory: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The memory after a block: memory (B, C, H+2), the block's layer input (B, M, H) ->
        (B, C', H+2), C' <= C + M, detached, without the memories dropped for expiry."""
        M = hidden.size(1)
        old, _, ages = unpack(memory)
        states = torch.cat([old, hidden.detach()], dim=1)  # (B, T, H)
        spans = self.spans(states)  # (B, T)
        next_ages = M - key_positions(ages, M)  # (B, T)
        expired = droppable(spans, next_ages, M, self.ramp)  # (B, T)
        count = drop_count(expired, M)
        if count:
            keep = keep_indices(spans, next_ages, expired, count)  # (B, T-count)
            states = states.gather(1, keep.unsqueeze(-1).expand(-1, -1, states.size(-1)))  # (B, T-count, H)
            spans, next_ages = spans.gather(1, keep), next_ages.gather(1, keep)  # (B, T-count)
        return pack(states, spans, next_ages)  # (B, C', H+2)


def memory_stats(memories: List[torch.Tensor]) -> List[dict]:
    """Per layer: the mean and largest span of its kept memories (as of the block that kept
    them) and the memory length (host syncs: for the log, not for every step)."""
    out = []
    for memory in memories:
        _, spans, _ = unpack(memory)
        empty = spans.numel() == 0
        out.append({"avg": 0.0 if empty else spans.float().mean().item(),
                    "max": 0.0 if empty else spans.max().item(), "mem": memory.size(1)})
    return out


def summary(layers: List[dict]) -> dict:
    """Over the layers: ``span_avg`` and ``mem_avg`` (means), ``span_max`` and ``mem_max``."""
    n = max(len(layers), 1)
    return {"span_avg": sum(s["avg"] for s in layers) / n, "span_max": max(s["max"] for s in layers),
            "mem_avg": sum(s["mem"] for s in layers) / n, "mem_max": max(s["mem"] for s in layers)}


def equal_lengths(memories: List[torch.Tensor], attn_lim: int, ramp: int) -> List[torch.Tensor]:
    """Memories of one layer from several ranks (B_r, C_r, H+2) padded in front to the longest
    C, so that their rows can be stacked: zero states at an age of at least L + R beyond the
    oldest, which every query gives a zero mask (whatever their span) and the next block drops."""
    longest = max(m.size(1) for m in memories)
    oldest = max((unpack(m)[2].max().item() for m in memories if m.size(1)), default=0.0)
    out = []
    for m in memories:
        pad = longest - m.size(1)
        dead = m.new_zeros(m.size(0), pad, m.size(2))  # (B_r, pad, H+2)
        dead[..., -1] = oldest + attn_lim + ramp + torch.arange(pad, 0, -1, dtype=m.dtype)  # ages
        out.append(torch.cat([dead, m], dim=1))  # (B_r, longest, H+2)
    return out
