"""Generation with a key/value cache: one new position per step at fixed weights.

Dimension legend: B batch (samples), P prompt length, C cached positions of a layer,
H hidden, K heads, D = H / K head dim, G heads of a window group, W the group's
window, N persistent vectors, V vocabulary, L max span.

``TransformerSeq`` carries hidden states between blocks, so a one-position step
re-projects the keys and values of every cached position in every layer. With the
weights fixed (eval mode, no gradient) ``KVCache`` keeps, per layer and per group of
heads sharing a window W, the projected keys and values of the W previous positions
in a ring buffer: position p lives in slot p mod W. The windows are those the model's
attention uses (``attention.head_windows`` for the grouped path, the kept length
``attention.kept_length`` for ``--attn-impl reference``), so each softmax, span mask
and ``+ 1e-8`` renormalisation runs over the same positions as in the full
recomputation, and a step costs the projections of one position plus O(W x D) per head.

The query at position t attends to the W positions t-W .. t-1 (never itself): the slots
as they are before position t is written. Slot s is at distance d = t - p, i.e. at
column (s - t) mod W of the model's window (column 0 the farthest), so its position
embedding and span mask are a contiguous slice of the window's columns laid out twice.
Persistent vectors sit in front of the ring (rows 0 .. N-1) with no position term and
no mask, so one softmax and one renormalisation cover both (joint softmax/renormalise).
Positions before the start are zero hidden states, as in the model's zero caches: zero
keys and values (the projections have no bias) that still take a position logit.

The prompt runs through the model's own forward in blocks; the cached hidden states it
returns (the last C >= W inputs of every layer) are projected once into the rings.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from attention import group_heads, head_windows, kept_length
from models import TransformerSeq, TransformerSeqLayer


@dataclass
class WindowGroup:
    """Heads ``start .. stop-1`` of a layer (in its group order) sharing window W."""
    start: int
    stop: int
    window: int
    pe: torch.Tensor  # (D, 2W): the window's position embeddings, twice (shared by layers)
    mask: Optional[torch.Tensor]  # (G, 1, 2W): the span mask over the window, twice
    pers_key: Optional[torch.Tensor]  # (G, D, N), scaled as used
    pers_val: Optional[torch.Tensor]  # (G, N, D), scaled as used
    keys: Optional[torch.Tensor] = None  # (B, G, D, N+W): persistent columns, then the ring
    values: Optional[torch.Tensor] = None  # (B, G, N+W, D): persistent rows, then the ring


@dataclass
class LayerPlan:
    """One layer's weights, transposed for row-vector products (x @ w), and its groups."""
    w_qkv: torch.Tensor  # (H, 3H): query columns pre-scaled by 1/sqrt(D), key, value; group order
    w_out: torch.Tensor  # (H, H): input rows in group order
    norm1: torch.nn.LayerNorm
    ff: Optional[tuple]  # (w1 (H, I), b1 (I,), w2 (I, H), b2 (H,)) or None
    norm2: Optional[torch.nn.LayerNorm]
    groups: List[WindowGroup]
    npers: int


def layer_windows(model: TransformerSeq, layer: TransformerSeqLayer) -> List[int]:
    """Per head: the positions its softmax runs over in the model's attention."""
    cfg = model.cfg
    if cfg.attn_impl == "reference":
        return [kept_length(layer.span, cfg.attn_span)] * cfg.nheads
    return head_windows(layer.span, cfg.nheads, cfg.attn_span)


def _permute_heads(weight: torch.Tensor, order: List[int], dim: int, K: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) of an (H, H) weight, head blocks in ``order``."""
    H = weight.size(0)
    if dim == 0:
        return weight.view(K, H // K, H)[order].reshape(H, H)  # (H, H)
    return weight.view(H, K, H // K)[:, order].reshape(H, H)  # (H, H)


def _doubled_pe(model: TransformerSeq, window: int, shared: dict) -> torch.Tensor:
    """(D, 2W): the last W columns of key_pe, twice; one copy per window for all layers."""
    if window not in shared:
        pe = model.key_pe[0, :, model.cfg.attn_span - window:]  # (D, W)
        shared[window] = torch.cat([pe, pe], -1).contiguous()  # (D, 2W)
    return shared[window]


def plan_layer(model: TransformerSeq, layer: TransformerSeqLayer, shared_pe: dict) -> LayerPlan:
    K, D = model.cfg.nheads, model.cfg.head_dim
    groups, order = group_heads(layer_windows(model, layer))
    attn = layer.attn
    w_q = _permute_heads(attn.proj_query.weight, order, 0, K) / math.sqrt(D)  # (H, H)
    w_k = _permute_heads(attn.proj_key.weight, order, 0, K)  # (H, H)
    w_v = _permute_heads(attn.proj_val.weight, order, 0, K)  # (H, H)
    w_qkv = torch.cat([w_q, w_k, w_v]).t().contiguous()  # (H, 3H)
    w_out = _permute_heads(attn.proj_out.weight, order, 1, K).t().contiguous()  # (H, H)
    span, pers = layer.span, attn.attn.persistent_memory
    plans, start = [], 0
    for window, members in groups:
        stop = start + (len(members) if isinstance(members, list) else members.stop - members.start)
        heads = order[start:stop]
        mask = span.mask(window)[heads] if span is not None else None  # (G, 1, W)
        pers_key = pers_val = None
        if pers is not None:
            pers_key = (pers.key[heads] * math.sqrt(D)).contiguous()  # (G, D, N)
            pers_val = (pers.val[heads] * math.sqrt(pers.size)).contiguous()  # (G, N, D)
        plans.append(WindowGroup(start, stop, window, _doubled_pe(model, window, shared_pe),
                                 torch.cat([mask, mask], -1).contiguous() if mask is not None else None,
                                 pers_key, pers_val))
        start = stop
    ff = None
    if layer.ff is not None:
        fc1, fc2 = layer.ff.fc1, layer.ff.fc2
        ff = (fc1.weight.t().contiguous(), fc1.bias, fc2.weight.t().contiguous(), fc2.bias)
    return LayerPlan(w_qkv, w_out, layer.norm1, ff, layer.norm2, plans,
                     pers.size if pers is not None else 0)


class KVCache:
    """Projected keys and values of a batch of streams, for ``model`` with fixed weights.

    ``prefill`` runs the prompt, then each ``step`` appends one token per stream and
    returns the log-probabilities of the next one."""

    def __init__(self, model: TransformerSeq):
        if model.training:
            raise ValueError("KVCache needs the model in eval mode (fixed weights, no dropout)")
        self.model = model
        shared_pe = {}
        with torch.no_grad():
            self.plans = [plan_layer(model, layer, shared_pe) for layer in model.layers]
        self.position = 0  # positions seen so far, the next one's index

    def memory_bytes(self) -> int:
        """Bytes held by the rings (keys, values and persistent rows) of every layer."""
        return sum(t.numel() * t.element_size() for p in self.plans for g in p.groups
                   for t in (g.keys, g.values) if t is not None)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, block: int, batch_size: int = 0) -> torch.Tensor:
        """Run prompts ``ids`` (B0, P), P >= 1, through the model's forward in blocks of
        ``block`` from zero caches and fill the rings; returns log-probabilities (B0, P, V).
        With ``batch_size`` B > B0 = 1, the one prompt starts B streams."""
        B0, P = ids.shape
        B = batch_size or B0
        if P < 1 or (B != B0 and B0 != 1):
            raise ValueError(f"prefill: need a prompt of >= 1 token and 1 or {B} prompts, got {tuple(ids.shape)}")
        caches = self.model.init_cache(B0, ids.device)
        out = []
        for start in range(0, P, block):
            log_probs, caches = self.model(ids[:, start:start + block], caches)  # (B0, m, V)
            out.append(log_probs)
        for plan, hidden in zip(self.plans, caches):
            self._fill(plan, hidden, P, B)
        self.position = P
        return torch.cat(out, 1)  # (B0, P, V)

    def _fill(self, plan: LayerPlan, hidden: torch.Tensor, P: int, B: int) -> None:
        """Rings of one layer from its last C cached inputs ``hidden`` (B0, C, H), C >= W."""
        B0, C, H = hidden.shape
        N, D = plan.npers, H // self.model.cfg.nheads
        w_k, w_v = plan.w_qkv[:, H:2 * H], plan.w_qkv[:, 2 * H:]  # (H, H) each
        for g in plan.groups:
            W, G = g.window, g.stop - g.start
            recent = hidden[:, C - W:]  # (B0, W, H): positions P-W .. P-1
            proj = []
            for w in (w_k, w_v):
                x = torch.matmul(recent, w[:, g.start * D:g.stop * D])  # (B0, W, G*D)
                x = x.view(B0, W, G, D).transpose(1, 2)  # (B0, G, W, D)
                proj.append(torch.roll(x, P % W, dims=2))  # (B0, G, W, D): p in slot p mod W
            g.keys = hidden.new_empty(B, G, D, N + W)  # (B, G, D, N+W)
            g.values = hidden.new_empty(B, G, N + W, D)  # (B, G, N+W, D)
            g.keys[..., N:] = proj[0].transpose(2, 3)  # (B, G, D, W)
            g.values[:, :, N:] = proj[1]  # (B, G, W, D)
            if N:
                g.keys[..., :N] = g.pers_key  # (B, G, D, N)
                g.values[:, :, :N] = g.pers_val  # (B, G, N, D)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per stream: ``tokens`` (B,) -> log-probabilities (B, V) of the next."""
        B = tokens.size(0)
        h = self.model.in_emb(tokens.view(B, 1)).view(B, -1)  # (B, H)
        for plan in self.plans:
            h = self._layer(plan, h)  # (B, H)
        self.position += 1
        return self._output(h)  # (B, V)

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, V) of the next token from the last layer's h (B, H)."""
        if self.model.cfg.adapt_io:
            return self.model.output(h.unsqueeze(1), None).squeeze(1)  # (B, V)
        out = self.model.out_emb
        return F.log_softmax(F.linear(h, out.weight, out.bias), dim=-1)  # (B, V)

    def _layer(self, plan: LayerPlan, h: torch.Tensor) -> torch.Tensor:
        """One layer at one position: h (B, H) -> (B, H)."""
        B, H = h.shape
        K = self.model.cfg.nheads
        qkv = torch.mm(h, plan.w_qkv).view(B, 3, K, H // K)  # (B, 3, K, D)
        q, k, v = qkv.unbind(1)  # (B, K, D) each
        outs = [self._attend(g, q, k, v, plan.npers) for g in plan.groups]  # (B, G, D) each
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]  # (B, K, D) in group order
        h = torch.addmm(h, out.view(B, H), plan.w_out)  # (B, H): h + attention
        norm = plan.norm1
        h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # (B, H)
        if plan.ff is not None:
            w1, b1, w2, b2 = plan.ff
            inner = torch.addmm(b1, h, w1).relu_()  # (B, I)
            h = torch.addmm(h + b2, inner, w2)  # (B, H): h + feed-forward
            norm = plan.norm2
            h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # (B, H)
        return h

    def _attend(self, g: WindowGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                N: int) -> torch.Tensor:
        """Heads of ``g`` at the current position: q, k, v (B, K, D) -> (B, G, D); then the
        position's key and value replace the farthest one in the ring."""
        B, G, D, W = q.size(0), g.stop - g.start, q.size(2), g.window
        r = self.position % W
        qg = q.narrow(1, g.start, G).reshape(B * G, D)  # (BG, D)
        pe_logits = torch.mm(qg, g.pe.narrow(1, W - r, W))  # (BG, W): slots 0 .. W-1
        qg = qg.view(B * G, 1, D)  # (BG, 1, D)
        keys = g.keys.view(B * G, D, N + W)  # (BG, D, N+W)
        if N:
            logits = torch.bmm(qg, keys).view(B * G, N + W)  # (BG, N+W)
            logits.narrow(1, N, W).add_(pe_logits)  # (BG, W)
        else:
            logits = torch.baddbmm(pe_logits.view(B * G, 1, W), qg, keys).view(B * G, W)  # (BG, W)
        probs = torch.softmax(logits, dim=-1)  # (BG, N+W)
        if g.mask is not None:
            probs.view(B, G, N + W).narrow(2, N, W).mul_(g.mask.narrow(2, W - r, W).view(G, W))  # (B, G, W)
            probs.div_(probs.sum(-1, keepdim=True).add_(1e-8))  # (BG, N+W)
        out = torch.bmm(probs.view(B * G, 1, N + W), g.values.view(B * G, N + W, D))  # (BG, 1, D)
        g.keys.select(3, N + r).copy_(k.narrow(1, g.start, G))  # (B, G, D)
        g.values.select(2, N + r).copy_(v.narrow(1, g.start, G))  # (B, G, D)
        return out.view(B, G, D)
