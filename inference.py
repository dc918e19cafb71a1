"""Generation with a key/value cache: one new position per step at fixed weights.

Dimension legend: B batch (samples), P prompt length, C cached positions of a layer,
H hidden, K heads, D = H / K head dim, G heads of a window group, W the group's
window, N persistent vectors, V vocabulary, L max span, I feed-forward inner size,
S the key (or value) rows of a layer, sum over (b, head) of N + W.

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
The rings of a layer are views of one key buffer (D, S) and one value buffer (S, D), so
the new position's keys and values go into every head's ring with one ``index_copy_``.
Memory: 2 x B x sum over layers and heads of (N + W) x D floats (55 MiB in float32 for
the enwik8-size model of scripts/bench.py --generation), against B x C x H floats per
layer for the hidden-state caches.

The prompt runs through the model's own forward in blocks; the cached hidden states it
returns (the last C >= W inputs of every layer) are projected once into the rings.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from attention import head_windows, kept_length
from models import TransformerSeq, TransformerSeqLayer


def group_heads(windows: List[int]) -> Tuple[list, list]:
    """[(window, heads)] by increasing window, every head in the group of its own window (a
    one-token step gains nothing from merging windows), and the concatenated head order."""
    groups: dict = {}
    for head, window in enumerate(windows):
        groups.setdefault(window, []).append(head)
    out = sorted(groups.items())
    return out, [head for _, heads in out for head in heads]


@dataclass
class WindowGroup:
    """Heads ``start .. stop-1`` of a layer (in its group order) sharing window W."""
    start: int
    stop: int
    window: int
    pe: torch.Tensor  # (D, 2W): the window's position embeddings, twice (shared by layers)
    mask: Optional[torch.Tensor]  # (G, 2W): the span mask over the window, twice
    pers_key: Optional[torch.Tensor]  # (G, D, N), scaled as used
    pers_val: Optional[torch.Tensor]  # (G, N, D), scaled as used
    keys: Optional[torch.Tensor] = None  # (BG, D, N+W) view of the layer's keys: persistent, ring
    values: Optional[torch.Tensor] = None  # (BG, N+W, D) view of the layer's values: persistent, ring


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
    keys: Optional[torch.Tensor] = None  # (D, S): every group's (b, head, N+W) columns, S in all
    values: Optional[torch.Tensor] = None  # (S, D): the same rows
    ring_base: Optional[torch.Tensor] = None  # (BK,): column of slot 0 of every (b, head)
    ring_size: Optional[torch.Tensor] = None  # (BK,): its window W


def layer_windows(model: TransformerSeq, layer: TransformerSeqLayer) -> List[int]:
    """Per head: the positions its softmax runs over (``attention.head_windows``: its span,
    rounded up to 64, within L'), or L' for every head with --attn-impl reference. The
    grouped path's planner may score a head over a wider, merged window; the two then differ
    by the renormalisation's 1e-8 term only (see attention.py)."""
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
    """Heads grouped by window (``group_heads``) and permuted into group order in the
    fused projection weights; each group's position embeddings, span mask, persistent vectors."""
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
        stop = start + len(members)
        heads = order[start:stop]
        mask = span.mask(window)[heads] if span is not None else None  # (G, 1, W)
        pers_key = pers_val = None
        if pers is not None:
            pers_key = (pers.key[heads] * math.sqrt(D)).contiguous()  # (G, D, N)
            pers_val = (pers.val[heads] * math.sqrt(pers.size)).contiguous()  # (G, N, D)
        if mask is not None:
            mask = torch.cat([mask, mask], -1).view(len(heads), 2 * window)  # (G, 2W)
        plans.append(WindowGroup(start, stop, window, _doubled_pe(model, window, shared_pe), mask,
                                 pers_key, pers_val))
        start = stop
    ff = None
    if layer.ff is not None:
        fc1, fc2 = layer.ff.fc1, layer.ff.fc2
        ff = (fc1.weight.t().contiguous(), fc1.bias, fc2.weight.t().contiguous(), fc2.bias)
    return LayerPlan(w_qkv, w_out, layer.norm1, ff, layer.norm2, plans,
                     pers.size if pers is not None else 0)


def _ring(recent: torch.Tensor, weight: torch.Tensor, g: WindowGroup, D: int, P: int) -> torch.Tensor:
    """Keys or values (``weight`` (H, H), head columns in group order) of the group's heads
    at positions P-W .. P-1 from ``recent`` (B0, W, H) -> (B0, G, W, D), p in slot p mod W."""
    B0, W, _ = recent.shape
    x = torch.matmul(recent, weight[:, g.start * D:g.stop * D])  # (B0, W, G*D)
    x = torch.roll(x.view(B0, W, g.stop - g.start, D), P % W, dims=1)  # (B0, W, G, D)
    return x.transpose(1, 2)  # (B0, G, W, D)


class KVCache:
    """Projected keys and values of a batch of streams, for ``model`` with fixed weights.

    ``prefill`` runs the prompt, then each ``step`` appends one token per stream and
    returns the log-probabilities of the next one."""

    def __init__(self, model: TransformerSeq):
        if model.training:
            raise ValueError("KVCache needs the model in eval mode (fixed weights, no dropout)")
        if model.cfg.adapt_span_dynamic:
            raise ValueError("KVCache does not support dynamic spans (--adapt-span-dynamic): "
                             "their windows follow each position; use the full recomputation")
        self.model = model
        shared_pe = {}
        with torch.no_grad():
            self.plans = [plan_layer(model, layer, shared_pe) for layer in model.layers]
        self.position = 0  # positions seen so far, the next one's index
        self.batch_size = 0  # streams, set by prefill
        self._layouts = {}  # ring layout -> (ring_base, ring_size), shared by layers
        self._slots = {}  # this step's ring slot per (b, head), per layout
        self._eps = model.key_pe.new_tensor(1e-8)  # the renormalisation's 1e-8 (no cast per use)

    def memory_bytes(self) -> int:
        """Bytes held by the rings (keys, values and persistent rows) of every layer."""
        return sum(t.numel() * t.element_size() for p in self.plans for t in (p.keys, p.values)
                   if t is not None)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, block: int, batch_size: int = 0) -> torch.Tensor:
        """Run prompts ``ids`` (B0, P), P >= 1, through the model's forward in blocks of
        ``block`` from zero caches and fill the rings; returns log-probabilities (B0, P, V).
        With ``batch_size`` B > B0 = 1, the one prompt starts B streams."""
        B0, P = ids.shape
        B = batch_size or B0
        if P < 1 or (B != B0 and B0 != 1):
            raise ValueError(f"prefill: need a prompt of >= 1 token and 1 or {B} prompts, "
                             f"got ids of shape {tuple(ids.shape)}")
        caches = self.model.init_cache(B0, ids.device)
        out = []
        for start in range(0, P, block):
            log_probs, caches = self.model(ids[:, start:start + block], caches)  # (B0, m, V)
            out.append(log_probs)
        for plan, hidden in zip(self.plans, caches):
            self._fill(plan, hidden, P, B)
        self.position, self.batch_size = P, B
        return torch.cat(out, 1)  # (B0, P, V)

    def _fill(self, plan: LayerPlan, hidden: torch.Tensor, P: int, B: int) -> None:
        """Rings of one layer from its last C cached inputs ``hidden`` (B0, C, H), C >= W."""
        B0, C, H = hidden.shape
        N, D = plan.npers, H // self.model.cfg.nheads
        size = sum(B * (g.stop - g.start) * (N + g.window) for g in plan.groups)
        plan.keys, plan.values = hidden.new_empty(D, size), hidden.new_empty(size, D)  # (D, S), (S, D)
        base, wins, col = [[] for _ in range(B)], [[] for _ in range(B)], 0
        for g in plan.groups:
            W, G = g.window, g.stop - g.start
            g.keys = plan.keys.narrow(1, col, B * G * (N + W)).view(D, B * G, N + W).permute(1, 0, 2)
            g.values = plan.values.narrow(0, col, B * G * (N + W)).view(B * G, N + W, D)
            for b in range(B):
                base[b] += [col + (b * G + j) * (N + W) + N for j in range(G)]
                wins[b] += [W] * G
            col += B * G * (N + W)
            keys = _ring(hidden[:, C - W:], plan.w_qkv[:, H:2 * H], g, D, P)  # (B0, G, W, D)
            values = _ring(hidden[:, C - W:], plan.w_qkv[:, 2 * H:], g, D, P)  # (B0, G, W, D)
            g.keys[:, :, N:] = keys.transpose(2, 3).expand(B, -1, -1, -1).reshape(B * G, D, W)
            g.values[:, N:] = values.expand(B, -1, -1, -1).reshape(B * G, W, D)
            if N:
                g.keys[:, :, :N] = g.pers_key.repeat(B, 1, 1)  # (BG, D, N)
                g.values[:, :N] = g.pers_val.repeat(B, 1, 1)  # (BG, N, D)
        key = (tuple(sum(base, [])), tuple(sum(wins, [])))  # layers of one layout share them
        if key not in self._layouts:
            self._layouts[key] = tuple(torch.tensor(x, device=hidden.device) for x in key)  # (BK,) x 2
        plan.ring_base, plan.ring_size = self._layouts[key]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per stream: ``tokens`` (B,) -> log-probabilities (B, V) of the next."""
        B = tokens.size(0)
        if B != self.batch_size:
            raise ValueError(f"step: {B} tokens for {self.batch_size} streams (prefill first)")
        h = self.model.in_emb(tokens.view(B, 1)).view(B, -1)  # (B, H)
        self._slots.clear()
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
        outs = [self._attend(g, q, plan.npers) for g in plan.groups]  # (B, G, D) each
        slots = self._slots.get(id(plan.ring_base))
        if slots is None:
            slots = torch.remainder(self.position, plan.ring_size).add_(plan.ring_base)  # (BK,)
            self._slots[id(plan.ring_base)] = slots
        plan.keys.index_copy_(1, slots, k.reshape(B * K, -1).t())  # (D, S): position t replaces t-W
        plan.values.index_copy_(0, slots, v.reshape(B * K, -1))  # (S, D)
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

    def _attend(self, g: WindowGroup, q: torch.Tensor, N: int) -> torch.Tensor:
        """Heads of ``g`` at the current position over the W previous ones: q (B, K, D) -> (B, G, D)."""
        B, G, D, W = q.size(0), g.stop - g.start, q.size(2), g.window
        r = self.position % W
        qg = q.narrow(1, g.start, G).reshape(B * G, 1, D)  # (BG, 1, D)
        pe_logits = torch.mm(qg.view(B * G, D), g.pe.narrow(1, W - r, W))  # (BG, W): slots 0 .. W-1
        if N:
            logits = torch.bmm(qg, g.keys)  # (BG, 1, N+W)
            logits.view(B * G, N + W).narrow(1, N, W).add_(pe_logits)  # (BG, W)
        else:
            logits = torch.baddbmm(pe_logits.view(B * G, 1, W), qg, g.keys)  # (BG, 1, W)
        probs = torch.softmax(logits, dim=-1)  # (BG, 1, N+W)
        if g.mask is None:
            return torch.bmm(probs, g.values).view(B, G, D)  # (B, G, D)
        mask = g.mask.narrow(1, W - r, W)  # (G, W)
        (probs.view(B, G, N + W).narrow(2, N, W) if N else probs.view(B, G, W)).mul_(mask)  # (B, G, W)
        total = probs.sum(-1, keepdim=True).add_(self._eps)  # (BG, 1, 1): renormalised after the read
        return torch.bmm(probs, g.values).div_(total).view(B, G, D)  # (B, G, D)
