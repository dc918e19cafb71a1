"""Generation with a key/value cache: one new position per step at fixed weights.

Dimension legend: B batch (samples), P prompt length, C cached positions of a layer,
H hidden, K heads, D = H / K head dim, G heads of a window group, W the group's
window, N persistent vectors, V vocabulary, S the key (or value) rows of a layer,
sum over (b, head) of W.

``TransformerSeq`` carries hidden states between blocks, so a one-position step
re-projects the keys and values of every cached position in every layer. With the
weights fixed (eval mode, no gradient) ``KVCache`` keeps, per layer and per group of
heads sharing a window W, the projected keys and values of the W previous positions
in a ring buffer: position p lives in slot p mod W. A step runs the model's own layers
(``TransformerSeqLayer.forward``: projections, residuals, post-norms, feed-forward,
persistent memory), each given its ``LayerKV`` in place of the hidden-state cache;
``LayerKV.attend`` scores the rings and turns the logits into weights with
``attention.attention_weights``, the function every attention path calls.

The windows are those the model's attention uses for each head: ``attention.head_windows``
(the head's span, rounded up to 64, within L') for the grouped path, whose softmax runs over
the head's own window whatever group the planner scores it in, and the kept length L'
(``attention.kept_length``) for ``--attn-impl reference``. So each softmax, span mask and
``+ 1e-8`` renormalisation runs over the same positions as in the full recomputation, and
a step costs the projections of one position plus O(W x D) per head.

The query at position t attends to the W positions t-W .. t-1 (never itself): the slots
as they are before position t is written. Slot s is at distance d = t - p, i.e. at
column (s - t) mod W of the model's window (column 0 the farthest), so its position
embedding and span mask are a contiguous slice of the window's columns laid out twice.
Positions before the start are zero hidden states, as in the model's zero caches: zero
keys and values (the projections have no bias) that still take a position logit.
The rings of a layer are views of one key buffer (D, S) and one value buffer (S, D), so
the new position's keys and values go into every head's ring with one ``index_copy_``.
Memory: 2 x B x sum over layers and heads of W x D floats (55 MiB in float32 for the
enwik8-size model of scripts/bench.py --generation), against B x C x H floats per layer
for the hidden-state caches; plus a copy of each layer's projection and feed-forward weights,
transposed for row-vector products (x @ w), the memory order a one-row product reads faster
(144 MiB for that model; python scripts/bench_generation_ab.py).

With --expire-span each layer keeps the projected keys and values of its unexpired memories
instead (expire_inference.py).

The prompt runs through the model's own forward in blocks; the cached hidden states it
returns (the last C >= W inputs of every layer) are projected once into the rings.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from attention import attention_weights, head_windows, kept_length
from expire_inference import ExpireLayerKV
from models import SeqAttention, TransformerSeq, TransformerSeqLayer


def group_heads(windows: List[int]) -> Tuple[list, list]:
    """[(window, heads)] by increasing window, every head in the group of its own window (a
    one-token step gains nothing from merging windows), and the concatenated head order."""
    groups: dict = {}
    for head, window in enumerate(windows):
        groups.setdefault(window, []).append(head)
    out = sorted(groups.items())
    return out, [head for _, heads in out for head in heads]


def layer_windows(model: TransformerSeq, layer: TransformerSeqLayer) -> List[int]:
    """Per head: the positions its softmax runs over in the model (``attention.head_windows``:
    its span, rounded up to 64, within L'), or L' for every head with --attn-impl reference."""
    cfg = model.cfg
    if cfg.attn_impl == "reference":
        return [kept_length(layer.span, cfg.attn_span)] * cfg.nheads
    return head_windows(layer.span, cfg.nheads, cfg.attn_span)


@dataclass
class WindowGroup:
    """Heads ``start .. stop-1`` of a layer's group order (``heads`` in model order) sharing W."""
    start: int
    stop: int
    window: int
    heads: object  # slice or (G,) index tensor of the group's heads, in model order
    pe: torch.Tensor  # (D, 2W): the window's position embeddings, twice (shared by layers)
    mask: Optional[torch.Tensor]  # (G, 1, 2W): the span mask over the window, twice
    keys: Optional[torch.Tensor] = None  # (BG, D, W) view of the layer's key buffer
    values: Optional[torch.Tensor] = None  # (BG, W, D) view of the layer's value buffer


class LayerKV:
    """The projected keys and values of one layer, in rings per window group; given to the
    layer in place of its hidden-state cache (``MultiHeadSeqAttention.forward``)."""

    def __init__(self, owner: "KVCache", layer: TransformerSeqLayer, shared_pe: dict):
        model = owner.model
        self.owner, self.layer = owner, layer
        self.pers = layer.attn.attn.persistent_memory
        groups, order = group_heads(layer_windows(model, layer))
        device = model.key_pe.device
        self.order = torch.tensor(order, device=device)  # (K,) group order
        self.permuted = order != sorted(order)
        self.inverse = None if order == sorted(order) else torch.tensor(
            sorted(range(len(order)), key=order.__getitem__), device=device)  # (K,)
        self.groups, start = [], 0
        for window, members in groups:
            stop = start + len(members)
            contiguous = members == list(range(members[0], members[-1] + 1))
            heads = slice(members[0], members[-1] + 1) if contiguous else torch.tensor(members, device=device)
            mask = layer.span.mask(window)[heads] if layer.span is not None else None  # (G, 1, W)
            mask = torch.cat([mask, mask], -1) if mask is not None else None  # (G, 1, 2W)
            self.groups.append(WindowGroup(start, stop, window, heads, _doubled_pe(model, window, shared_pe), mask))
            start = stop
        attn = layer.attn
        # the layer's projection weights, transposed for row-vector products (x @ w): one
        # product gives a position's query (divided by sqrt(D), so its logits come scaled:
        # ``attention_weights(..., scaled=True)``), key and value
        w_query = attn.proj_query.weight / math.sqrt(attn.attn.head_dim)  # (H, H)
        self.w_qkv = torch.cat([w_query, attn.proj_key.weight,
                                attn.proj_val.weight]).t().contiguous()  # (H, 3H)
        self.w_out = attn.proj_out.weight.t().contiguous()  # (H, H)
        ff = layer.ff  # the feed-forward's weights in the same order (FeedForward.forward)
        self.ff_weights = (ff.fc1.weight.t().contiguous(), ff.fc2.weight.t().contiguous()) \
            if ff is not None else None  # (H, I), (I, H)
        self.keys = self.values = None  # (D, S), (S, D)
        self.ring_base = self.ring_size = None  # (BK,) each: column of slot 0, window W; model head order

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def fill(self, hidden: torch.Tensor, P: int, B: int) -> None:
        """Rings from the layer's last C cached inputs ``hidden`` (B0, C, H), C >= W, after P positions."""
        B0, C, H = hidden.shape
        attn, K = self.layer.attn, self.owner.model.cfg.nheads
        D = H // K
        size = sum(B * (g.stop - g.start) * g.window for g in self.groups)
        self.keys, self.values = hidden.new_empty(D, size), hidden.new_empty(size, D)  # (D, S), (S, D)
        base, wins, col = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long), 0
        for g in self.groups:
            W, G = g.window, g.stop - g.start
            g.keys = self.keys.narrow(1, col, B * G * W).view(D, B * G, W).permute(1, 0, 2)  # (BG, D, W)
            g.values = self.values.narrow(0, col, B * G * W).view(B * G, W, D)  # (BG, W, D)
            heads = self.order[g.start:g.stop].cpu()  # (G,)
            base[:, heads] = col + torch.arange(B * G).view(B, G) * W
            wins[:, heads] = W
            col += B * G * W
            recent = hidden[:, C - W:]  # (B0, W, H)
            for ring, proj in ((g.keys, attn.proj_key), (g.values, attn.proj_val)):
                x = proj(recent).view(B0, W, K, D)[:, :, g.heads]  # (B0, W, G, D)
                x = torch.roll(x, P % W, dims=1).transpose(1, 2).expand(B, -1, -1, -1)  # (B, G, W, D): p in slot p mod W
                ring.copy_(x.transpose(2, 3).reshape(B * G, D, W) if ring is g.keys else x.reshape(B * G, W, D))
        self.ring_base, self.ring_size = self.owner.layout(base.view(-1), wins.view(-1), hidden.device)

    def attend(self, h: torch.Tensor, attn: SeqAttention) -> torch.Tensor:
        """The layer's attention (projections included) at the current position over the
        rings, then its keys and values written in: h (B, H) -> (B, H)."""
        B, H = h.shape
        K, D = attn.nheads, attn.head_dim
        q, k, v = torch.mm(h, self.w_qkv).view(B, 3, K, D).unbind(1)  # (B, K, D) each
        q = q.index_select(1, self.order) if self.permuted else q  # (B, K, D) in group order
        t = self.owner.position
        outs = [self._group(g, q.narrow(1, g.start, g.stop - g.start), attn, t) for g in self.groups]
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]  # (B, K, D) in group order
        if self.inverse is not None:
            out = out.index_select(1, self.inverse)  # (B, K, D)
        slots = self.owner.slots(self.ring_base, self.ring_size)  # (BK,): position t replaces t-W
        self.keys.index_copy_(1, slots, k.reshape(B * K, D).t())  # (D, S)
        self.values.index_copy_(0, slots, v.reshape(B * K, D))  # (S, D)
        return torch.mm(out.view(B, H), self.w_out)  # (B, H)

    def _group(self, g: WindowGroup, q: torch.Tensor, attn: SeqAttention, t: int) -> torch.Tensor:
        """Heads of ``g`` at position t over the W previous ones: q (B, G, D) -> (B, G, D)."""
        B, G, D = q.shape
        W = g.window
        r = t % W
        qg = q.reshape(B * G, 1, D)  # (BG, 1, D)
        pe_logits = torch.mm(qg.view(B * G, D), g.pe.narrow(1, W - r, W))  # (BG, W): slots 0 .. W-1
        logits = torch.baddbmm(pe_logits.view(B * G, 1, W), qg, g.keys).view(B, G, 1, W)  # (B, G, 1, W)
        mask = g.mask.narrow(2, W - r, W) if g.mask is not None else None  # (G, 1, W)
        pers = self.pers
        pers_logits = pers.logits(q.unsqueeze(2), g.heads) if pers is not None else None  # (B, G, 1, N)
        probs, pers_probs = attention_weights(logits, D, mask, pers_logits, scaled=True)  # (B, G, 1, W), (B, G, 1, N)
        out = torch.bmm(probs.view(B * G, 1, W), g.values).view(B, G, D)  # (B, G, D)
        if pers_probs is not None:
            out = out + pers.read(pers_probs, g.heads).view(B, G, D)  # (B, G, D)
        return out


def _doubled_pe(model: TransformerSeq, window: int, shared: dict) -> torch.Tensor:
    """(D, 2W): the last W columns of key_pe, twice; one copy per window for all layers."""
    if window not in shared:
        pe = model.key_pe[0, :, model.cfg.attn_span - window:]  # (D, W)
        shared[window] = torch.cat([pe, pe], -1).contiguous()  # (D, 2W)
    return shared[window]


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
        model.refresh_spans()  # the windows of the current span values
        shared_pe = {}
        self.position = 0  # positions seen so far, the next one's index
        self.batch_size = 0  # streams, set by prefill
        self._layouts = {}  # ring layout -> (ring_base, ring_size), shared by layers
        self._slots = {}  # this step's ring slot per (b, head), per layout
        with torch.no_grad():
            self.plans = [ExpireLayerKV(self, layer) if layer.expire is not None
                          else LayerKV(self, layer, shared_pe) for layer in model.layers]

    def memory_bytes(self) -> int:
        """Bytes held by the rings (keys and values) of every layer."""
        return sum(plan.memory_bytes() for plan in self.plans)

    def layout(self, base: torch.Tensor, wins: torch.Tensor, device) -> tuple:
        """(ring_base, ring_size) on ``device``, one copy per distinct layout (layers share it)."""
        key = (tuple(base.tolist()), tuple(wins.tolist()))
        if key not in self._layouts:
            self._layouts[key] = (base.to(device), wins.to(device))
        return self._layouts[key]

    def slots(self, ring_base: torch.Tensor, ring_size: torch.Tensor) -> torch.Tensor:
        """This step's slot per (b, head) of a layout: base + position mod W (once per step)."""
        slots = self._slots.get(id(ring_base))
        if slots is None:
            slots = torch.remainder(self.position, ring_size).add_(ring_base)  # (BK,)
            self._slots[id(ring_base)] = slots
        return slots

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
            plan.fill(hidden, P, B)
        self.position, self.batch_size = P, B
        return torch.cat(out, 1)  # (B0, P, V)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per stream: ``tokens`` (B,) -> log-probabilities (B, V) of the next."""
        B = tokens.size(0)
        if B != self.batch_size:
            raise ValueError(f"step: {B} tokens for {self.batch_size} streams (prefill first)")
        model = self.model
        h = model.in_emb(tokens.view(B, 1)).view(B, -1)  # (B, H): one position, as rows
        self._slots.clear()
        for layer, plan in zip(model.layers, self.plans):
            h = layer(h, plan, model.key_pe)  # (B, H): the model's layer, keys and values cached
        self.position += 1
        return model.output(h.unsqueeze(1), None).view(B, -1)  # (B, V)
