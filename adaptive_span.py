"""Adaptive attention span (Sukhbaatar et al., 2019), depending only on torch.

Each head k learns z_k = current_val[k] * L, and the attention weight at
distance d (x = d - 1) is multiplied by the soft mask

    m_z(x) = clamp((R + z - x) / R, 0, 1)

after the softmax, then renormalised. An L1 penalty on z shrinks the spans and
keys farther than the longest span can be dropped ("trimmed").

Every rule that turns the span parameters into integers lives here, once:
``head span`` (positions whose mask is non-zero), ``reach`` (positions whose mask
or its gradient is non-zero), the reference's ``max_span`` / ``avg_span``,
``trim_length``, ``kept_length`` L', ``cache_length`` and ``head_window`` W.
``AdaptiveSpan.refresh`` computes them with one host sync and caches them as
plain ints (``SpanState``); the forward pass only reads the cache.

When the cache is stale (no host sync to find out): it is keyed on what every write
of ``current_val`` changes, read from the host without touching the values:
- the parameter object, its version counter (in-place ops on it: ``copy_``,
  ``clamp_``, ``load_state_dict``, non-fused optimizers), its storage address, dtype
  and device (``p.data = ...``, ``vector_to_parameters``, ``.to()``, ``.double()``);
- a count of reads and writes of its ``.data`` (``SpanParameter``): ``p.data.copy_``
  and every other write through ``.data`` bypass the version counter;
- a count of optimizer steps in this process (a global
  ``torch.optim.optimizer.register_optimizer_step_post_hook``): fused and foreach optimizers
  may write without moving the version counter.
A stale cache is recomputed at its next use (one host sync); ``refresh_spans`` does
it for many layers with one sync (``TransformerSeq`` calls it after every optimizer
step and, if any layer is stale, at the start of a forward). So a training loop pays
one sync per step and a forward between two writes pays none. A write this key
cannot see: through an alias made before it was cached that bypasses autograd
(``p.numpy()``, a ``.data`` tensor kept from earlier), or into a plain ``Parameter`` put
in ``current_val``'s place; call ``refresh_spans`` after those.

Dimension legend: B batch, M block length, L max span, K heads, D head dim.
Positions of a span window are ordered from farthest (index 0) to nearest.

The state-dict names (``_mask.current_val``, ``_mask.mask_template``) are those
of the reference implementation so its checkpoints load unchanged.
"""
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

TRIM_GRANULARITY = 64  # the reference trims memory in multiples of 64 positions
WINDOW_BUCKET = 64  # a head's window is its reach rounded up to a multiple of this


# ---- what every write of a span parameter changes -----------------------------
_OPTIMIZER_STEPS = itertools.count(1)  # next(...) after every optimizer step of the process
_steps_seen = [0]  # optimizer steps so far


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _steps_seen[0] = next(_OPTIMIZER_STEPS)


register_optimizer_step_post_hook(_count_optimizer_step)


class SpanParameter(nn.Parameter):
    """A Parameter that counts the uses of its ``.data`` (``p.data.copy_(...)``, ``p.data = x``,
    ``vector_to_parameters``, module dtype/device moves): writes through ``.data`` do not move
    the version counter, so the span cache also keys on this count."""
    data_uses = 0

    @property
    def data(self) -> torch.Tensor:
        self.data_uses += 1
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self.data_uses += 1
        torch._C.TensorBase.data.__set__(self, value)


def param_key(p: torch.Tensor) -> tuple:
    """Changes with every write of ``p`` (see the module doc), read without a host sync."""
    return (id(p), p._version, p.data_ptr(), p.dtype, p.device, getattr(p, "data_uses", 0),
            _steps_seen[0])


# ---- the integer rules (plain ints in, plain ints out) ---------------------------
def reference_span(val: float, max_size: int, ramp: int) -> int:
    """The reference's span of a value of ``current_val`` (its max or mean):
    ``clamp(ceil(val * L) + R, 0, L)`` with ``val * L`` in double precision."""
    return int(min(max(math.ceil(val * max_size) + ramp, 0), max_size))


def trim_length(max_span: int, max_size: int) -> int:
    """How many of the farthest positions the reference drops (a multiple of 64)."""
    return min(max_size - 1, max_size - max_span) // TRIM_GRANULARITY * TRIM_GRANULARITY


def kept_length(max_span: int, max_size: int) -> int:
    """L', the positions the reference keeps after trimming."""
    return max_size - trim_length(max_span, max_size)


def cache_length(max_span: int, max_size: int, adapt_cache: bool) -> int:
    """Hidden states to keep between blocks: L, or L' + 64 with the adaptive cache."""
    if not adapt_cache:
        return max_size
    return min(max_size, kept_length(max_span, max_size) + TRIM_GRANULARITY)


def head_window(reach: int, keep: int) -> int:
    """Positions a head scores: its reach rounded up to 64 (at least 64), within L'."""
    return min(keep, max(WINDOW_BUCKET, -(-reach // WINDOW_BUCKET) * WINDOW_BUCKET))


def head_windows(reaches: Sequence[int], keep: int) -> List[int]:
    """``head_window`` of every head of a layer."""
    return [head_window(r, keep) for r in reaches]


@dataclass(frozen=True)
class SpanState:
    """The integers of one layer's spans, computed once per parameter update."""
    spans: Tuple[int, ...]  # per head: positions whose mask is non-zero
    reach: Tuple[int, ...]  # per head: positions whose mask or its gradient is non-zero
    max_span: int  # the reference's span of max(current_val)
    avg_span: int  # the reference's span of mean(current_val)
    trim: int  # trim_length(max_span)
    keep: int  # L' = L - trim
    cache: int  # cache_length
    windows: Tuple[int, ...]  # per head: head_window(reach, keep)


class SpanReaders:
    """The integers of a layer's spans, read from its ``state()`` (a ``SpanState``)."""

    def head_spans(self) -> List[int]:
        """Per head: the number of positions whose mask is non-zero."""
        return list(self.state().spans)

    def reach(self) -> List[int]:
        """Per head: positions whose mask *or its gradient* is non-zero (the clamp passes
        gradient at exactly 0), i.e. where the unclamped mask is >= 0."""
        return list(self.state().reach)

    def head_windows(self) -> List[int]:
        """Per head: the key positions the grouped path scores (``head_window``)."""
        return list(self.state().windows)

    def max_span(self) -> int:
        """The reference's ``clamp(ceil(max(current_val) * L) + R, 0, L)``."""
        return self.state().max_span

    def avg_span(self) -> float:
        """The reference's ``clamp(ceil(mean(current_val) * L) + R, 0, L)``."""
        return float(self.state().avg_span)

    def trim_len(self) -> int:
        """How many of the farthest positions the reference drops (a multiple of 64)."""
        return self.state().trim

    def kept_len(self) -> int:
        """L' = L - trim_len()."""
        return self.state().keep

    def cache_size(self) -> int:
        """Hidden states to keep between blocks: L, or the learned span + 64."""
        return self.state().cache


# The renormalisation's 1e-8 as a CPU scalar tensor of the probabilities' dtype: the same
# value (and sums) as the Python number, without wrapping it in a new tensor at every call.
_EPS = {dtype: torch.tensor(1e-8, dtype=dtype) for dtype in (torch.float32, torch.float64)}


def mask_renormalise(probs: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Probabilities (…, W) times the span mask, renormalised as the reference does:
    ``p m / (sum(p m) + 1e-8)``. ``in_place`` reuses ``probs`` (only without autograd)."""
    if not in_place:
        probs = probs * mask  # (…, W)
        return probs / (probs.sum(-1, keepdim=True) + 1e-8)  # (…, W)
    total = probs.mul_(mask).sum(-1, keepdim=True).add_(_EPS.get(probs.dtype, 1e-8))  # (…, 1)
    return probs.div_(total)  # (…, W)


class AdaptiveMask(nn.Module):
    """The soft mask ``clamp((template + z) / R + 1, 0, 1)`` over L positions."""

    def __init__(self, max_size: int, ramp_size: int, init_val: float, nheads: int):
        super().__init__()
        self.max_size = max_size
        self.ramp_size = ramp_size
        self.current_val = SpanParameter(torch.full((nheads, 1, 1), float(init_val)))  # (K, 1, 1)
        self.register_buffer("mask_template", torch.linspace(1 - max_size, 0, steps=max_size))  # (L,)

    def values(self, length: int) -> torch.Tensor:
        """The mask of the ``length`` nearest positions, right-aligned."""
        mask = self.mask_template + self.current_val * self.max_size  # (K, 1, L)
        mask = mask / self.ramp_size + 1  # (K, 1, L)
        mask = mask.clamp(0, 1)  # (K, 1, L)
        if length < self.max_size:
            mask = mask[:, :, -length:]  # (K, 1, length)
        return mask


class AdaptiveSpan(SpanReaders, nn.Module):
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
        self._state = None  # (version key, SpanState)

    @property
    def current_val(self) -> nn.Parameter:
        return self._mask.current_val  # (K, 1, 1)

    def mask(self, length: int) -> torch.Tensor:
        """Mask of the ``length`` nearest positions for every head."""
        return self._mask.values(length)  # (K, 1, length)

    def mask_probs(self, attn: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mask attention probabilities of shape (B, K, M, L') right-aligned, then renormalise."""
        if normalize:
            return mask_renormalise(attn, self.mask(attn.size(-1)))  # (B, K, M, L')
        return attn * self.mask(attn.size(-1))  # (B, K, M, L')

    # ---- the cached integers -------------------------------------------------
    def _param_key(self) -> tuple:
        return param_key(self.current_val)

    def stale(self) -> bool:
        """Whether current_val was written since the integers were cached (no host sync)."""
        return self._state is None or self._state[0] != self._param_key()

    def state_tensor(self) -> torch.Tensor:
        """(2K + 2,) float64: head spans, reaches (counts of the mask tensor itself, so
        they agree with it exactly), then max and mean of current_val."""
        m = self._mask
        cv = m.current_val.detach()  # (K, 1, 1)
        raw = (m.mask_template + cv * m.max_size) / m.ramp_size + 1  # (K, 1, L) the unclamped mask
        spans = (raw.clamp(0, 1) > 0).sum(-1).view(-1)  # (K,)
        reach = (raw >= 0).sum(-1).view(-1)  # (K,)
        stats = torch.stack([cv.max(), cv.mean()]).double()  # (2,)
        return torch.cat([spans.double(), reach.double(), stats])  # (2K + 2,)

    def set_state(self, values: Sequence[float]) -> SpanState:
        """Cache the integers from the plain values of ``state_tensor`` (no sync)."""
        K, L = self.nheads, self.attn_span
        max_span = reference_span(values[2 * K], L, self.ramp)
        keep = kept_length(max_span, L)
        reach = tuple(int(r) for r in values[K:2 * K])
        state = SpanState(spans=tuple(int(s) for s in values[:K]), reach=reach,
                          max_span=max_span, avg_span=reference_span(values[2 * K + 1], L, self.ramp),
                          trim=trim_length(max_span, L), keep=keep,
                          cache=cache_length(max_span, L, self.adapt_cache),
                          windows=tuple(head_windows(reach, keep)))
        self._state = (self._param_key(), state)
        return state

    def refresh(self) -> SpanState:
        """Recompute the cached integers (one host sync)."""
        return self.set_state(self.state_tensor().tolist())

    def state(self) -> SpanState:
        """The cached integers; recomputed (one host sync) only if current_val changed."""
        if self.stale():
            return self.refresh()
        return self._state[1]

    # ---- training hooks ----------------------------------------------------
    def loss(self) -> torch.Tensor:
        """L1 span penalty ``lambda * L * mean_heads(current_val)``."""
        return self.loss_coeff * self.attn_span * self.current_val.mean()

    @torch.no_grad()
    def clamp_param(self) -> None:
        self.current_val.clamp_(0, 1)


class DynamicSpan(SpanReaders, nn.Module):
    """Spans that depend on the input (the paper's section 2.2): per head k and query t,
    ``z_{t,k} = L * sigmoid(v_k . x_t + b_k)``, with v_k, b_k learned (``span_logit``).

    ``observe(x)`` computes the spans of a block and reads, with one host sync, the integers
    that size the computation: they follow the largest z of the block (the head windows, the
    reference's trim). ``mask(length)`` is then the per-query mask (B, K, T, length) with the
    same right-aligned layout as ``AdaptiveSpan.mask``; ``loss()`` is ``loss_coeff`` times the
    mean z over heads and real positions of the last block. With v = 0 this is the static span
    z = L * sigmoid(b). The cache keeps all L positions: a later block may ask for any span.
    """

    def __init__(self, attn_span: int, nheads: int, hidden_size: int, ramp: int = 32,
                 init_val: float = 0.0, loss_coeff: float = 0.0):
        super().__init__()
        self.attn_span, self.nheads, self.ramp, self.loss_coeff = attn_span, nheads, ramp, loss_coeff
        self.span_logit = nn.Linear(hidden_size, nheads)  # weight v (K, H), bias b (K,)
        frac = min(max(float(init_val), 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.span_logit.weight.zero_()
            self.span_logit.bias.fill_(math.log(frac / (1 - frac)))
        self._z = None  # (B, T, K) spans of the last block
        self._real = None  # (B, T) its real (not padded) positions
        self._state = None  # SpanState of the last block

    def observe(self, x: torch.Tensor, real: torch.Tensor = None) -> SpanState:
        """Spans of a block x (B, T, H) at its ``real`` (B, T) positions (default: all)."""
        L, R, K = self.attn_span, self.ramp, self.nheads
        z = L * torch.sigmoid(self.span_logit(x))  # (B, T, K)
        real = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if real is None else real  # (B, T)
        zd = z.detach().masked_fill(~real.unsqueeze(-1), 0)  # (B, T, K)
        count = real.sum().clamp(min=1)
        top = torch.cat([zd.amax((0, 1)), (zd.sum() / (count * K)).view(1)]).tolist()  # one sync
        self._z, self._real = z, real
        reach = tuple(min(L, math.floor(R + t) + 1) for t in top[:K])
        spans = tuple(min(L, max(0, math.ceil(R + t))) for t in top[:K])
        max_span = reference_span(max(top[:K]) / L, L, R)
        keep = kept_length(max_span, L)
        self._state = SpanState(spans=spans, reach=reach, max_span=max_span,
                                avg_span=reference_span(top[K] / L, L, R),
                                trim=trim_length(max_span, L), keep=keep, cache=L,
                                windows=tuple(head_windows(reach, keep)))
        return self._state

    def mask(self, length: int) -> torch.Tensor:
        """The last block's mask of the ``length`` nearest positions: (B, K, T, length)."""
        x = torch.arange(length - 1, -1, -1, device=self._z.device, dtype=self._z.dtype)  # (length,)
        z = self._z.transpose(1, 2).unsqueeze(-1)  # (B, K, T, 1)
        return ((self.ramp + z - x) / self.ramp).clamp(0, 1)  # (B, K, T, length)

    def loss(self) -> torch.Tensor:
        """``loss_coeff`` times the mean z over heads and the last block's real positions."""
        if self._z is None:
            return self.span_logit.bias.new_zeros(())
        real = self._real.unsqueeze(-1).to(self._z.dtype)  # (B, T, 1)
        return self.loss_coeff * (self._z * real).sum() / (real.sum() * self.nheads).clamp(min=1)

    def state(self) -> SpanState:
        """The integers of the last block; before any block, of the bias-only spans
        z = L * sigmoid(b) (what a zero input gives)."""
        if self._state is not None:
            return self._state
        with torch.no_grad():
            state = self.observe(self.span_logit.bias.new_zeros(1, 1, self.span_logit.in_features))
        self._z = self._real = self._state = None
        return state

    def clamp_param(self) -> None:
        """Nothing to clamp: sigmoid keeps z in (0, L)."""


def refresh_spans(spans: Iterable[AdaptiveSpan]) -> None:
    """Cache the integers of many static spans with one host sync (e.g. after an optimizer
    step, for every ``AdaptiveSpan`` of a model: ``[m for m in model.modules() if
    isinstance(m, AdaptiveSpan)]``); a span that is not refreshed here refreshes itself,
    with its own sync, at its next use."""
    spans = [span for span in spans if not span.current_val.is_meta]
    if not spans:
        return
    states = [span.state_tensor() for span in spans]  # (2K + 2,) each
    values = torch.cat([s.to(states[0].device) for s in states]).tolist()  # one sync
    start = 0
    for span, state in zip(spans, states):
        span.set_state(values[start:start + state.numel()])
        start += state.numel()
