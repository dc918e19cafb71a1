"""Transformer language model with cached relative-position attention, adaptive
span and persistent memory: the ``TransformerSeq`` of the reference, with its
state-dict names.

Dimension legend: B batch, M block length, L max span, C cached positions,
H hidden, I feed-forward inner size, K heads, D = H / K head dim,
N persistent vectors, V vocabulary.

Layers are post-LayerNorm: ``h = LN1(h + Attn(h))`` then ``LN2(h + FF(h))``
(no FF and no LN2 when persistent memory replaces it). The cache of layer l
holds the last ``cache_size`` inputs of layer l, detached; with expire span, its
unexpired inputs with their spans and ages (expire_span.py), a length that varies.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptive_io import build_adaptive_io, tied_counterpart, tied_mismatches, zero_dependency
from adaptive_span import AdaptiveSpan, DynamicSpan, refresh_spans
from attention import attention_plan, grouped_attention, reference_attention
from config import ModelConfig  # noqa: F401  (the model's settings; importable from here)
from expire_attention import expire_attention
from expire_span import ExpireSpan, equal_lengths, key_positions, unpack
from persistent_memory import PersistentMemory

ATTN_IMPLS = {"grouped": grouped_attention, "reference": reference_attention}  # config.ATTN_IMPL_NAMES


class SeqAttention(nn.Module):
    """Holds the span and persistent-memory modules (reference name: ``attn.attn``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nheads = cfg.nheads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.impl = ATTN_IMPLS[cfg.attn_impl]
        self.adaptive_span = None
        self.persistent_memory = None
        self.expire_span = None
        if cfg.expire_span:
            self.expire_span = ExpireSpan(cfg.hidden_size, cfg.attn_lim, cfg.expire_span_ramp,
                                          cfg.expire_span_pre_div, cfg.expire_span_init_percentage,
                                          cfg.expire_span_loss, cfg.expire_span_noisy)
        if cfg.adapt_span and cfg.adapt_span_dynamic:
            self.adaptive_span = DynamicSpan(cfg.attn_span, cfg.nheads, cfg.hidden_size,
                                             cfg.adapt_span_ramp, cfg.adapt_span_init,
                                             cfg.adapt_span_loss)
        elif cfg.adapt_span:
            self.adaptive_span = AdaptiveSpan(cfg.attn_span, cfg.nheads, cfg.adapt_span_ramp,
                                              cfg.adapt_span_init, cfg.adapt_span_loss,
                                              cfg.adapt_span_cache)
        if cfg.pers_mem_size > 0:
            self.persistent_memory = PersistentMemory(cfg.pers_mem_size, cfg.nheads, cfg.head_dim,
                                                      cfg.dropout)

    @property
    def dynamic(self) -> bool:
        return isinstance(self.adaptive_span, DynamicSpan)

    def plan(self, batch: int, block: int, max_span: int) -> Optional[tuple]:
        """The integers of this layer's attention (``attention.attention_plan``); None with a
        dynamic span, whose integers follow each block's input."""
        if self.dynamic or self.expire_span is not None:
            return None
        return attention_plan(self.adaptive_span, self.nheads, max_span, batch, block,
                              self.head_dim)

    def forward(self, query, h_all, w_key, w_val, key_pe, plan=None, positions=None):
        """``positions`` (B, C+M): each key's position from the block's first query, with
        expire span (``expire_attention``)."""
        if self.expire_span is not None:
            return expire_attention(query, h_all, positions, w_key, w_val, key_pe, self.nheads,
                                    self.expire_span, self.persistent_memory, self.dropout,
                                    self.training)  # (B, M, H)
        if self.dynamic:  # the block's spans, from the layer input (the last M rows of h_all)
            self.adaptive_span.observe(h_all[:, h_all.size(1) - query.size(1):])
        return self.impl(query, h_all, w_key, w_val, key_pe, self.nheads, self.adaptive_span,
                         self.persistent_memory, self.dropout, self.training, plan)  # (B, M, H)


class MultiHeadSeqAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.attn = SeqAttention(cfg)
        # registration order of the reference (it fixes the optimizer-state order)
        self.proj_query = nn.Linear(H, H, bias=False)
        self.proj_out = nn.Linear(H, H, bias=False)
        self.proj_val = nn.Linear(H, H, bias=False)
        self.proj_key = nn.Linear(H, H, bias=False)

    def forward(self, h: torch.Tensor, cache, key_pe: torch.Tensor,
                plan: Optional[tuple] = None) -> torch.Tensor:
        """``cache``: the layer's previous inputs (B, C, H), or a key/value cache whose
        ``attend(h, attn)`` is this attention over the projected past (``inference.LayerKV``;
        h (B, H), one position per row)."""
        if not isinstance(cache, torch.Tensor):  # generation: keys and values projected once
            return cache.attend(h, self.attn)  # (B, M, H)
        query = self.proj_query(h)  # (B, M, H)
        positions = None
        if self.attn.expire_span is not None:  # cache: expire_span's memory (B, C, H+2)
            cache, _, ages = unpack(cache)  # (B, C, H), _, (B, C)
            positions = key_positions(ages, h.size(1))  # (B, C+M)
        h_all = torch.cat([cache, h], dim=1)  # (B, C+M, H)
        out = self.attn(query, h_all, self.proj_key.weight, self.proj_val.weight, key_pe,
                        plan, positions)  # (B, M, H)
        return self.proj_out(out)  # (B, M, H)


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.fc2 = nn.Linear(inner_size, hidden_size)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, weights: Optional[tuple] = None) -> torch.Tensor:
        """``weights``: fc1's and fc2's weights transposed and contiguous, (H, I) and (I, H),
        for rows h (B, H) (generation: ``inference.LayerKV.ff_weights``), else None."""
        w1, w2 = weights if weights is not None else (None, None)
        inner = F.relu(_linear(h, self.fc1, w1), inplace=not torch.is_grad_enabled())  # (B, M, I)
        if self.training:
            inner = F.dropout(inner, self.dropout, self.training)  # (B, M, I)
        return _linear(inner, self.fc2, w2)  # (B, M, H)


def _linear(x: torch.Tensor, fc: nn.Linear, weight_t: Optional[torch.Tensor]) -> torch.Tensor:
    """``fc(x)``; with ``weight_t`` (in, out), fc's weight transposed and contiguous, the same
    product for rows x (B, in), from the memory order that one-row products read faster
    (python scripts/bench_generation_ab.py)."""
    if weight_t is None:
        return fc(x)  # (…, out)
    return torch.addmm(fc.bias, x, weight_t)  # (B, out)


class TransformerSeqLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = MultiHeadSeqAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.ff = None
        self.norm2 = None
        if cfg.has_ff:
            self.ff = FeedForward(cfg.hidden_size, cfg.inner_hidden_size, cfg.dropout)
            self.norm2 = nn.LayerNorm(cfg.hidden_size)

    @property
    def span(self) -> Optional[AdaptiveSpan]:
        return self.attn.attn.adaptive_span

    @property
    def expire(self) -> Optional[ExpireSpan]:
        return self.attn.attn.expire_span

    def forward(self, h: torch.Tensor, cache, key_pe: torch.Tensor,
                plan: Optional[tuple] = None) -> torch.Tensor:
        """``plan``: the attention's integers (``SeqAttention.plan``), read from the span
        when None; a compiled layer is given them, so that they are guarded constants.
        ``cache``: hidden states (B, C, H) or a key/value cache (``MultiHeadSeqAttention``),
        which also holds the feed-forward weights in row-product order (``FeedForward``)."""
        h = self.norm1(h + self.attn(h, cache, key_pe, plan))  # (B, M, H)
        if self.ff is not None:
            ff_weights = None if isinstance(cache, torch.Tensor) else cache.ff_weights
            h = self.norm2(h + self.ff(h, ff_weights))  # (B, M, H)
        return h


def update_cache(cache: torch.Tensor, h: torch.Tensor, size: int) -> torch.Tensor:
    """The last ``size`` rows of ``[cache; h]``, detached."""
    M = h.size(1)
    if size > M:
        return torch.cat([cache[:, max(cache.size(1) - (size - M), 0):], h], dim=1).detach()  # (B, <=size, H)
    return h[:, M - size:].detach()  # (B, size, H)


class TransformerSeq(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, V = cfg.hidden_size, cfg.vocab_size
        self.key_pe = nn.Parameter(torch.randn(1, cfg.head_dim, cfg.attn_span))  # (1, D, L)
        if cfg.adapt_io:  # adaptive input + projected adaptive softmax (adaptive_io.py)
            self.in_emb, self.out_emb = build_adaptive_io(V, H, cfg.adapt_io_cutoffs,
                                                          cfg.adapt_io_divval, cfg.adapt_io_tied)
            if cfg.adapt_io_tied:
                self.register_load_state_dict_pre_hook(_check_tied_state)
        else:
            self.in_emb = nn.Embedding(V, H)
            self.out_emb = nn.Linear(H, V)
        self.layers = nn.ModuleList(TransformerSeqLayer(cfg) for _ in range(cfg.nlayers))
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.compiled_layers = None  # set by compile_model.compile_layers
        self.refresh_spans()

    # ---- forward -----------------------------------------------------------
    def forward(self, x: torch.Tensor, caches: List[torch.Tensor],
                target: Optional[torch.Tensor] = None):
        """x (B, M) token ids. Returns per-token NLL (B, M) when ``target`` is given,
        else log-probabilities (B, M, V); and the next caches."""
        if any(span.stale() for span in self._static_spans()):
            self.refresh_spans()  # a span parameter was written since: one sync for all layers
        h = self.in_emb(x)  # (B, M, H)
        h = F.dropout(h, self.cfg.emb_dropout, self.training)  # (B, M, H)
        next_caches = []
        B, M = x.shape
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            next_caches.append(self.next_cache(layer, cache, h))  # (B, C', H) or (B, C', H+2)
            plan = layer.attn.attn.plan(B, M, self.cfg.attn_span)
            run = self.compiled_layers[i] if self.compiled_layers else layer
            h = run(h, cache, self.key_pe, plan)  # (B, M, H)
        h = F.dropout(h, self.cfg.emb_dropout, self.training)  # (B, M, H)
        return self.output(h, target), next_caches

    def output(self, h: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-token NLL (B, M) for ``target``, else log-probabilities (B, M, V)."""
        if self.cfg.adapt_io:
            if target is None:
                return self.out_emb.log_prob(h)  # (B, M, V)
            nll = self.out_emb(h, target)  # (B, M)
            if torch.is_grad_enabled():  # every adaptive parameter in the graph, for DDP
                nll = nll + zero_dependency([self.in_emb, self.out_emb])  # (B, M)
            return nll
        log_probs = F.log_softmax(self.out_emb(h), dim=-1)  # (B, M, V)
        if target is None:
            return log_probs
        return -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, M)

    # ---- cache -------------------------------------------------------------
    def next_cache(self, layer: TransformerSeqLayer, cache: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The layer's cache after the block whose layer input is h (B, M, H): its last
        positions, or with expire span the memories that have not expired (B, C', H+2)."""
        if layer.expire is not None:
            return layer.expire.next_memory(cache, h)  # (B, C', H+2)
        return update_cache(cache, h, self.layer_cache_size(layer))  # (B, C', H)

    def join_rows(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """One layer's caches of groups of rows (e.g. the passes of --batch-split) stacked
        (B, C, ...); expire-span memories of unequal lengths are first padded in front with
        memories that no query weighs (``expire_span.equal_lengths``)."""
        if self.cfg.expire_span and len({p.size(1) for p in parts}) > 1:
            parts = equal_lengths(parts, self.cfg.attn_lim, self.cfg.expire_span_ramp)
        return torch.cat(parts, dim=0)  # (B, C, ...)

    def clear_cache(self, caches: List[torch.Tensor]) -> List[torch.Tensor]:
        """The caches of streams that start afresh: zeros of the same shape, as the
        reference; with expire span an empty memory (B, 0, H+2)."""
        if self.cfg.expire_span:
            return [c[:, :0].clone() for c in caches]  # (B, 0, H+2)
        return [torch.zeros_like(c) for c in caches]  # (B, C, H)

    def layer_cache_size(self, layer: TransformerSeqLayer) -> int:
        return layer.span.cache_size() if layer.span is not None else self.cfg.attn_span

    def cache_sizes(self) -> List[int]:
        return [self.layer_cache_size(layer) for layer in self.layers]

    def init_cache(self, batch_size: int, device=None) -> List[torch.Tensor]:
        """Zero hidden states for every layer, as the reference starts."""
        device = device if device is not None else self.key_pe.device
        H = self.cfg.hidden_size
        if self.cfg.expire_span:  # an empty memory: hidden states, spans and ages (expire_span.py)
            return [torch.zeros(batch_size, 0, H + 2, device=device) for _ in self.layers]  # (B, 0, H+2)
        return [torch.zeros(batch_size, size, H, device=device) for size in self.cache_sizes()]  # (B, C, H)

    # ---- adaptive span -----------------------------------------------------
    def _spans(self) -> list:
        return [layer.span for layer in self.layers if layer.span is not None]

    def span_loss(self) -> torch.Tensor:
        """Sum over layers of ``lambda * L * mean_heads(current_val)``; with expire span, the
        auxiliary losses of the last training forward (``ExpireSpan.loss``, taken once)."""
        losses = [span.loss() for span in self._spans()]
        losses += [layer.expire.loss() for layer in self.layers if layer.expire is not None]
        return torch.stack(losses).sum() if losses else self.key_pe.new_zeros(())

    def clamp_spans(self) -> None:
        """Clamp every span parameter to [0, 1], then ``refresh_spans``."""
        for span in self._spans():
            span.clamp_param()
        self.refresh_spans()

    def _static_spans(self) -> List[AdaptiveSpan]:
        return [span for span in self._spans() if isinstance(span, AdaptiveSpan)]

    def refresh_spans(self) -> None:
        """Cache every layer's span integers (spans, windows, trim, cache size) with one
        host sync for the whole model, so that forward passes make none. Called at
        construction, by ``clamp_spans`` (after each optimizer step), after
        ``load_state_dict``, and by ``forward`` when any span parameter was written since
        (``AdaptiveSpan.stale``: in-place ops, ``.data`` writes, any optimizer step)."""
        refresh_spans(self._static_spans())

    def head_spans(self) -> List[List[int]]:
        """Per layer, per head: positions with a non-zero mask (L without adaptive span)."""
        L, K = self.cfg.attn_span, self.cfg.nheads
        return [layer.span.head_spans() if layer.span is not None else [L] * K
                for layer in self.layers]

    def span_stats(self) -> dict:
        """``span_avg`` (mean over layers) and ``span_max`` (max over layers), ramp included."""
        layers = self.layer_span_stats()
        if not layers:
            return {}
        return {"span_avg": sum(s["avg"] for s in layers) / len(layers),
                "span_max": max(s["max"] for s in layers)}

    def layer_span_stats(self) -> List[dict]:
        """Per layer with adaptive span: its ``avg`` and ``max`` span, ramp included."""
        return [{"avg": s.avg_span(), "max": float(s.max_span())} for s in self._spans()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- reference checkpoints ---------------------------------------------------
_PERS_SPAN_ALIAS = ".attn.attn.persistent_memory.adaptive_span."


def from_reference_state_dict(state: dict) -> dict:
    """Map a reference state dict (``module.`` prefix, span tensors registered
    twice with persistent memory) onto our names. A tensor shared by adaptive-I/O
    tying is kept under both names, and filled in when only one is present."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if _PERS_SPAN_ALIAS in key:
            primary = key.replace(_PERS_SPAN_ALIAS, ".attn.attn.adaptive_span.")
            if primary not in state and "module." + primary not in state:
                out[primary] = value
            continue
        out[key] = value
    for key in list(out):
        other = tied_counterpart(key)
        if other is not None and other not in out:
            out[other] = out[key]
    return out


def _refresh_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: the loaded spans' integers are cached at once."""
    module.refresh_spans()


def _check_tied_state(module, state, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook of a tied model: both names of a shared tensor
    must hold the same values (else the later one would silently win)."""
    errors.extend(f"tied adaptive-I/O tensors differ: {bad}" for bad in tied_mismatches(state, prefix))
