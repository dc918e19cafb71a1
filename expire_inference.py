"""Generation with expire span: the key/value cache of one layer keeps the unexpired
memories only (inference.KVCache uses it for a model built with --expire-span).

Dimension legend: B batch (samples), C kept memories, H hidden, K heads, D = H / K head dim,
P position embeddings (--attn-span), N persistent vectors.

Per layer it holds, for each kept memory, its projected key and value, its span e (from the
layer input, at the fixed weights) and its position. The query at position t weighs memory i
with the mask ``m = clamp((e_i - (t - i)) / R + 1, 0, 1)`` through ``attention.attention_weights``
(positions with m = 0 left out of the softmax), with a position logit for t - i <= P, as
expire_attention.py does over a block. After the step, the position's own key and value are
appended, and a memory whose ``e + R`` is no greater than its distance to the next position
is dropped (every later query would give it m = 0): each stream drops the batch's smallest
count of them, most expired first, so that the streams keep equal lengths.
"""
import torch

from attention import attention_weights, split_heads
from expire_span import droppable, keep_indices, unpack


class ExpireLayerKV:
    """The projected keys and values of one layer's unexpired memories; given to the layer in
    place of its memory (``MultiHeadSeqAttention.forward`` calls ``attend``)."""

    def __init__(self, owner, layer):
        self.owner, self.layer = owner, layer
        self.expire = layer.expire
        self.pers = layer.attn.attn.persistent_memory
        self.keys = self.values = None  # (B, K, C, D) each
        self.spans = self.positions = None  # (B, C) each
        self.ff_weights = None  # the feed-forward runs on the model's weights as stored

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def fill(self, memory: torch.Tensor, P: int, B: int) -> None:
        """From the layer's memory after the prompt (B0, C, H+2), P positions in, for B streams."""
        attn = self.layer.attn
        hidden, _, ages = unpack(memory)  # (B0, C, H), _, (B0, C)
        K = attn.attn.nheads
        self.keys = split_heads(attn.proj_key(hidden), K).expand(B, -1, -1, -1).contiguous()  # (B, K, C, D)
        self.values = split_heads(attn.proj_val(hidden), K).expand(B, -1, -1, -1).contiguous()  # (B, K, C, D)
        self.spans = self.expire.spans(hidden).expand(B, -1).contiguous()  # (B, C)
        self.positions = (P - ages).expand(B, -1).contiguous()  # (B, C)

    def attend(self, h: torch.Tensor, attn) -> torch.Tensor:
        """The layer's attention at the current position over the kept memories, then the
        position appended and the expired memories dropped: h (B, H) -> (B, H)."""
        B, H = h.shape
        proj = self.layer.attn
        K, D = attn.nheads, attn.head_dim
        t = self.owner.position
        q = proj.proj_query(h).view(B, K, 1, D)  # (B, K, 1, D)
        dist = (t - self.positions).unsqueeze(1)  # (B, 1, C)
        key_pe = self.owner.model.key_pe  # (1, D, P)
        P = key_pe.size(-1)
        index = (P - dist).clamp(0, P - 1).long()  # (B, 1, C)
        pe = torch.matmul(q, key_pe.unsqueeze(0))  # (B, K, 1, P)
        pe = pe.gather(-1, index.unsqueeze(1).expand(B, K, 1, index.size(-1)))  # (B, K, 1, C)
        logits = torch.matmul(q, self.keys.transpose(-1, -2)) + pe * (dist <= P).unsqueeze(1)  # (B, K, 1, C)
        mask = ((self.spans.unsqueeze(1) - dist) / self.expire.ramp + 1).clamp(0, 1).unsqueeze(1)  # (B, 1, 1, C)
        pers_logits = self.pers.logits(q) if self.pers is not None else None  # (B, K, 1, N)
        probs, pers_probs = attention_weights(logits, D, mask, pers_logits, mask == 0)  # (B, K, 1, C): eval
        out = torch.matmul(probs, self.values)  # (B, K, 1, D)
        if pers_probs is not None:
            out = out + self.pers.read(pers_probs)  # (B, K, 1, D)
        self._append(h, t)
        return proj.proj_out(out.view(B, H))  # (B, H)

    def _append(self, h: torch.Tensor, t: int) -> None:
        """Position t's key, value, span and position in; the expired memories out."""
        B, H = h.shape
        K = self.keys.size(1)
        proj = self.layer.attn
        self.keys = torch.cat([self.keys, proj.proj_key(h).view(B, K, 1, -1)], 2)  # (B, K, C+1, D)
        self.values = torch.cat([self.values, proj.proj_val(h).view(B, K, 1, -1)], 2)  # (B, K, C+1, D)
        self.spans = torch.cat([self.spans, self.expire.spans(h.unsqueeze(1))], 1)  # (B, C+1)
        self.positions = torch.cat([self.positions, self.positions.new_full((B, 1), t)], 1)  # (B, C+1)
        next_dist = t + 1 - self.positions  # (B, C+1)
        expired = droppable(self.spans, next_dist, 1, self.expire.ramp)  # (B, C+1)
        count = int(expired.sum(1).min().item())
        if count:
            keep = keep_indices(self.spans, next_dist, expired, count)  # (B, C')
            rows = keep.view(B, 1, -1, 1).expand(B, K, -1, self.keys.size(-1))  # (B, K, C', D)
            self.keys, self.values = self.keys.gather(2, rows), self.values.gather(2, rows)  # (B, K, C', D)
            self.spans, self.positions = self.spans.gather(1, keep), self.positions.gather(1, keep)  # (B, C')
