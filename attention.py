"""Cached relative-position attention with adaptive span and persistent memory.

Dimension legend: B batch, M block length, L max span, L' kept span (after
trimming), C cached positions, H hidden, K heads, D = H / K head dim,
N persistent vectors.

Each query attends to exactly the L previous positions (never to itself) of
``[cache; block]``. The logit for distance d = 1..L is
``(q_i . k_{i-d} + q_i . key_pe[:, :, L-d]) / sqrt(D)``; with adaptive span the
softmax is multiplied by the span mask and renormalised (``sum + 1e-8``).

``reference_attention`` computes exactly what the published reference does
(every head trimmed to the layer's longest span, rounded to 64, and a dense
M x (M + L') content product unskewed into M x L').

``grouped_attention`` computes the same function (up to float rounding and the
1e-8 term) at a cost that follows each head's learned span: each head needs a
window W (its reach rounded up to 64, ``AdaptiveSpan.head_windows``); a cost
model of the shapes (``plan_groups``) partitions the heads into groups, each
scored over its widest window, and each group projects keys and values for its
last W + M positions only, with its own rows of the projection weights, and
scores them, in query chunks or in one product, against its own band of W keys.
A head in a wider group leaves the columns beyond its own window out of its
softmax (``outside_windows``), so the result does not depend on the grouping,
which changes with the batch size and block length. One group of every head
over L' is the reference computation, with only the kept positions projected.

Where the two paths differ: both renormalise as ``p m / (sum(p m) + 1e-8)`` with
``attention_weights``, but the softmax p is taken over L' keys (reference) or over
the head's own window, so the 1e-8 weighs differently: with a = sum(p m) the mass a
head keeps inside its span in the reference's softmax, the outputs and each gradient
tensor differ by at most 8e-8 / a of the tensor's largest entry, and not at all for
a head whose window is L' (tests/test_attention.py, in float64).
"""
import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from adaptive_span import WINDOW_BUCKET, AdaptiveSpan, mask_renormalise
from persistent_memory import PersistentMemory, joint_renormalise, joint_softmax


def split_heads(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """(B, T, H) -> (B, K, T, D)."""
    B, T, H = x.shape
    return x.view(B, T, nheads, H // nheads).transpose(1, 2)  # (B, K, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, K, M, D) -> (B, M, H)."""
    B, K, M, D = x.shape
    return x.transpose(1, 2).reshape(B, M, K * D)  # (B, M, H)


def unskew(x: torch.Tensor) -> torch.Tensor:
    """(…, M, M+L) -> (…, M, L): row i keeps columns i .. i+L-1."""
    *lead, M, ML = x.shape
    L = ML - M
    x = x.reshape(*lead, M * ML)  # (…, M*(M+L))
    x = F.pad(x, (0, M))  # (…, M*(M+L+1))
    x = x.view(*lead, M, ML + 1)  # (…, M, M+L+1)
    return x[..., :L]  # (…, M, L)


def skew(x: torch.Tensor) -> torch.Tensor:
    """(…, M, L) -> (…, M, M+L): row i is placed at columns i .. i+L-1, zeros elsewhere."""
    *lead, M, L = x.shape
    x = F.pad(x, (0, M + 1))  # (…, M, L+M+1)
    x = x.reshape(*lead, M * (L + M + 1))  # (…, M*(L+M+1))
    x = x[..., :-M]  # (…, M*(L+M))
    return x.view(*lead, M, L + M)  # (…, M, M+L)


def fit_memory(h_all: torch.Tensor, block: int, keep: int) -> torch.Tensor:
    """Keep the ``keep`` positions before the block: cut the oldest, or left-pad zeros."""
    cached = h_all.size(1) - block
    if cached > keep:
        return h_all[:, cached - keep:]  # (B, keep+M, H)
    if cached < keep:
        return F.pad(h_all, (0, 0, keep - cached, 0))  # (B, keep+M, H)
    return h_all


def attention_weights(logits: torch.Tensor, head_dim: int, span_mask: Optional[torch.Tensor] = None,
                      pers_logits: Optional[torch.Tensor] = None, unseen: Optional[torch.Tensor] = None,
                      dropout: float = 0.0, training: bool = False, scaled: bool = False):
    """The one computation from logits to attention weights, for every path (reference,
    grouped, the drop-in module, generation): softmax of the context logits (…, W) divided by
    sqrt(D), jointly with the persistent logits (…, N) when given; times the span mask
    (broadcast to (…, W)) and renormalised as ``p m / (sum(p m) [+ sum(p_pers)] + 1e-8)``;
    dropout on the context weights. ``unseen`` (bool, broadcast to (…, W)): keys left out
    of the softmax (padding, or positions beyond a head's own window when it is scored in a
    wider group). ``scaled``: the logits are already divided by sqrt(D), their query having
    been (generation's; exactly the same numbers when D is a power of 4). Returns the context
    weights (…, W) and the persistent weights (…, N) or None (``PersistentMemory.read``
    applies their dropout)."""
    if unseen is not None:
        logits = logits.masked_fill(unseen, torch.finfo(logits.dtype).min)  # (…, W)
    in_place = not torch.is_grad_enabled()  # no graph to keep intact
    if pers_logits is None:
        probs = torch.softmax(logits if scaled else logits / math.sqrt(head_dim), -1)  # (…, W)
        if span_mask is not None:
            probs = mask_renormalise(probs, span_mask, in_place)  # (…, W)
        return F.dropout(probs, dropout, training) if training and dropout else probs, None
    probs, pers_probs = joint_softmax(logits, pers_logits, None if scaled else head_dim)  # (…, W), (…, N)
    if span_mask is not None:
        probs = probs * span_mask  # (…, W)
        probs, pers_probs = joint_renormalise(probs, pers_probs)  # (…, W), (…, N)
    return F.dropout(probs, dropout, training), pers_probs


def reference_attention(query: torch.Tensor, h_all: torch.Tensor, w_key: torch.Tensor,
                        w_val: torch.Tensor, key_pe: torch.Tensor, nheads: int,
                        span: Optional[AdaptiveSpan], pers: Optional[PersistentMemory],
                        dropout: float, training: bool, plan: Optional[tuple] = None,
                        unseen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference computation. query (B, M, H) projected, h_all (B, C+M, H) -> (B, M, H).
    ``plan``: ``attention_plan``'s integers, read from ``span`` when None. ``unseen``
    (K, 1, L'): keys outside each head's softmax (the grouped path's own windows), or None."""
    B, M, H = query.shape
    L = key_pe.size(-1)
    D = H // nheads
    trim = L - (plan[0] if plan is not None else kept_length(span, L))
    key = F.linear(h_all, w_key)  # (B, C+M, H)
    val = F.linear(h_all, w_val)  # (B, C+M, H)
    key = fit_memory(key, M, L - trim)  # (B, L'+M, H)
    val = fit_memory(val, M, L - trim)  # (B, L'+M, H)
    q = split_heads(query, nheads)  # (B, K, M, D)
    k = split_heads(key, nheads)  # (B, K, L'+M, D)
    v = split_heads(val, nheads)  # (B, K, L'+M, D)
    pe = key_pe[:, :, trim:]  # (1, D, L')
    logits = unskew(torch.matmul(q, k.transpose(-1, -2)))  # (B, K, M, L')
    logits = logits + torch.matmul(q, pe.unsqueeze(0))  # (B, K, M, L')
    mask = span.mask(L - trim) if span is not None else None  # (K, 1, L')
    pers_logits = pers.logits(q) if pers is not None else None  # (B, K, M, N)
    probs, pers_probs = attention_weights(logits, D, mask, pers_logits, unseen, dropout, training)
    out = torch.matmul(skew(probs), v)  # (B, K, M, D)
    if pers_probs is not None:
        out = out + pers.read(pers_probs)  # (B, K, M, D)
    return merge_heads(out)  # (B, M, H)


# ---- grouped attention: the cost follows each head's span ----------------------
BUCKET = WINDOW_BUCKET  # head windows are rounded up to a multiple of this many positions

# Cost model of one group of G heads over window W with query chunks of c (per batch
# row, in multiply-add equivalents): G * M * (D * (2 (c + W) + W)   [q.k, q.pe, p.v]
#   + 2 D H (W + M) / M   [its key and value rows]  + ELEM_COST * (W + 2 (c + W)))
# [element-wise passes over the (M, W) logits, the skew and unskew of (M, c + W)],
# plus GROUP_COST per group and CHUNK_COST per extra query chunk, independent of B.
# The three constants are measured by `OMP_NUM_THREADS=1 python scripts/fit_attention_cost.py
# --cases 40` (a least-squares fit of _group_attention forward+backward times), rounded; the
# fitted figures are in docs/performance.md. The plan depends on the shapes only, never on a timing.
ELEM_COST = 60.0
GROUP_COST = 5.0e6
CHUNK_COST = 1.0e6


def kept_length(span: Optional[AdaptiveSpan], max_span: int) -> int:
    """L', the positions the reference keeps after trimming (cached, no host sync)."""
    return span.kept_len() if span is not None else max_span


def head_windows(span: Optional[AdaptiveSpan], nheads: int, max_span: int,
                 keep: Optional[int] = None) -> List[int]:
    """Positions each head must see (``AdaptiveSpan.head_windows``: every position whose
    span mask *or its gradient* is non-zero, rounded up to 64, within L'); L' for every
    head without adaptive span. Cached integers, no host sync."""
    if span is None:
        return [max_span if keep is None else keep] * nheads
    return span.head_windows()


def attention_plan(span: Optional[AdaptiveSpan], nheads: int, max_span: int, batch: int,
                   block: int, width: int) -> tuple:
    """(L', groups, head order, head windows): every integer a layer's attention needs, from
    the span's cached state (no host sync). Computed outside the forward when it is compiled."""
    windows = tuple(head_windows(span, nheads, max_span))
    return (kept_length(span, max_span),) + plan_groups(windows, batch, block, width) + (windows,)


def outside_windows(windows: Sequence[int], width: int, device) -> Optional[torch.Tensor]:
    """(G, 1, width) bool: the columns of a group window of ``width`` beyond each head's own
    window (column 0 the farthest), or None when every head's window is the group's. The
    grouped path leaves them out of the head's softmax, so a head's weights are those of its
    own window whatever group the planner puts it in."""
    if min(windows) >= width:
        return None
    first = torch.tensor([width - w for w in windows], device=device).view(-1, 1, 1)  # (G, 1, 1)
    return torch.arange(width, device=device) < first  # (G, 1, width)


def group_cost(batch: int, block: int, width: int, hidden: int, window: int, heads: int,
               chunk: int) -> float:
    """The cost model above, for G = ``heads`` heads of dim D = ``width``."""
    M, D, W, c = block, width, window, chunk
    per_head = M * (D * (2 * (c + W) + W) + ELEM_COST * (W + 2 * (c + W))) + 2 * D * hidden * (W + M)
    return batch * heads * per_head + GROUP_COST + CHUNK_COST * (-(-M // c) - 1)


def merge_cost(batch: int, block: int, window: int, narrower: int) -> float:
    """Extra cost of scoring ``narrower`` heads over a wider window W: the forward and
    backward passes over their (M, W) logits that leave the columns beyond their own
    windows out of the softmax (``outside_windows``), at ELEM_COST per element."""
    return batch * narrower * block * ELEM_COST * 2 * window


def best_chunk(batch: int, block: int, width: int, hidden: int, window: int, heads: int) -> int:
    """The cheaper of one dense product (c = M) and chunks of about the window."""
    return min((block, chunk_size(block, window)),
               key=lambda c: group_cost(batch, block, width, hidden, window, heads, c))


@functools.lru_cache(maxsize=4096)
def plan_groups(windows: Tuple[int, ...], batch: int, block: int, width: int):
    """Partition the heads into groups of one window each, by the cost model: heads are
    sorted by window and each group is a run of that order scored over its widest window
    (dynamic programming over the runs). Returns [(window, chunk, heads)] with ``heads`` a
    slice when contiguous, else a tuple, and the head order of the concatenated groups."""
    hidden = width * len(windows)
    distinct = sorted(set(windows))
    count = [sum(1 for w in windows if w == d) for d in distinct]
    best = [(0.0, -1)] + [(math.inf, -1)] * len(distinct)  # best[j]: cost of runs 0..j-1
    for j in range(1, len(distinct) + 1):
        for i in range(j):
            G, W = sum(count[i:j]), distinct[j - 1]
            c = best_chunk(batch, block, width, hidden, W, G)
            cost = best[i][0] + group_cost(batch, block, width, hidden, W, G, c)
            if j - i > 1:  # a merged group: the narrower heads' ``outside_windows`` pass
                cost += merge_cost(batch, block, W, sum(count[i:j - 1]))
            if cost < best[j][0]:
                best[j] = (cost, i)
    cuts, j = [], len(distinct)
    while j > 0:
        cuts.append((best[j][1], j))
        j = best[j][1]
    out, order = [], []
    for i, j in reversed(cuts):
        W = distinct[j - 1]
        heads = [k for k, w in enumerate(windows) if distinct[i] <= w <= W]
        order.extend(heads)
        c = best_chunk(batch, block, width, hidden, W, len(heads))
        contiguous = heads == list(range(heads[0], heads[-1] + 1))
        out.append((W, c, slice(heads[0], heads[-1] + 1) if contiguous else tuple(heads)))
    return tuple(out), tuple(order)


def chunk_size(block: int, window: int) -> int:
    """Queries per chunk of the banded product: about the window, at least 64, at most M."""
    return min(block, max(BUCKET, window))


def overlapping_chunks(x: torch.Tensor, size: int, step: int) -> torch.Tensor:
    """(B, G, T, D) -> (B, G, n, size, D): rows i*step .. i*step+size-1 of each chunk i.
    Stacked slices (a copy, as the product needs one anyway): their backward is a few
    slice additions, where ``unfold``'s generic backward measured 1.4x slower."""
    n = (x.size(2) - size) // step + 1
    return torch.stack([x[:, :, i * step:i * step + size] for i in range(n)], dim=2)  # (B, G, n, size, D)


def band_logits(q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    """Content logits of the band: q (B, G, M, D), k (B, G, W+M, D) -> (B, G, M, W),
    where query i sees key rows i .. i+W-1. Chunks of ``chunk`` queries each multiply
    against their own c+W rows only (c = M is the dense skew/unskew product)."""
    B, G, M, D = q.shape
    W = k.size(2) - M
    if chunk >= M:
        return unskew(torch.matmul(q, k.transpose(-1, -2)))  # (B, G, M, W)
    n = -(-M // chunk)
    pad = n * chunk - M
    q = F.pad(q, (0, 0, 0, pad)).view(B, G, n, chunk, D)  # (B, G, n, c, D)
    k = overlapping_chunks(F.pad(k, (0, 0, 0, pad)), chunk + W, chunk)  # (B, G, n, c+W, D)
    logits = unskew(torch.matmul(q, k.transpose(-1, -2)))  # (B, G, n, c, W)
    return logits.reshape(B, G, n * chunk, W)[:, :, :M]  # (B, G, M, W)


def band_read(probs: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Weighted values of the band: probs (B, G, M, W), v (B, G, W+M, D) -> (B, G, M, D)."""
    B, G, M, W = probs.shape
    D = v.size(-1)
    if chunk >= M:
        return torch.matmul(skew(probs), v)  # (B, G, M, D)
    n = -(-M // chunk)
    pad = n * chunk - M
    probs = F.pad(probs, (0, 0, 0, pad)).view(B, G, n, chunk, W)  # (B, G, n, c, W)
    v = overlapping_chunks(F.pad(v, (0, 0, 0, pad)), chunk + W, chunk)  # (B, G, n, c+W, D)
    out = torch.matmul(skew(probs), v)  # (B, G, n, c, D)
    return out.reshape(B, G, n * chunk, D)[:, :, :M]  # (B, G, M, D)


def _select(x: torch.Tensor, heads, dim: int) -> torch.Tensor:
    """Heads ``heads`` (slice or index list) of ``x`` along ``dim``."""
    if isinstance(heads, slice):
        return x[(slice(None),) * dim + (heads,)]
    index = torch.tensor(list(heads), device=x.device)  # (G,)
    return x.index_select(dim, index)


def _pick(heads):
    """Head selector for PersistentMemory: the slice, or an index tensor."""
    return heads if isinstance(heads, slice) else torch.tensor(list(heads))


def _group_attention(q: torch.Tensor, h: torch.Tensor, w_key: torch.Tensor,
                     w_val: torch.Tensor, pe: torch.Tensor, mask: Optional[torch.Tensor],
                     pers: Optional[PersistentMemory], heads, chunk: int, dropout: float,
                     training: bool, unseen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of G heads over their window W: q (B, G, M, D), h (B, W+M, H), w_key and
    w_val (G*D, H), pe (1, D, W), mask (G, 1, W) or None, unseen (G, 1, W) or None -> (B, G, M, D)."""
    G, D = q.size(1), q.size(3)
    k = split_heads(F.linear(h, w_key), G)  # (B, G, W+M, D)
    v = split_heads(F.linear(h, w_val), G)  # (B, G, W+M, D)
    logits = band_logits(q, k, chunk)  # (B, G, M, W)
    logits = logits + torch.matmul(q, pe.unsqueeze(0))  # (B, G, M, W)
    pers_logits = pers.logits(q, _pick(heads)) if pers is not None else None  # (B, G, M, N)
    if logits.dtype in (torch.float16, torch.bfloat16) and (
            pers is None or torch.is_autocast_enabled(logits.device.type)):
        logits = logits.float()  # (B, G, M, W): softmax and mask in float32
        pers_logits = pers_logits.float() if pers_logits is not None else None  # (B, G, M, N)
    probs, pers_probs = attention_weights(logits, D, mask, pers_logits, unseen, dropout, training)
    out = band_read(probs.to(v.dtype), v, chunk)  # (B, G, M, D)
    return out + pers.read(pers_probs, _pick(heads)) if pers is not None else out  # (B, G, M, D)


def grouped_attention(query: torch.Tensor, h_all: torch.Tensor, w_key: torch.Tensor,
                      w_val: torch.Tensor, key_pe: torch.Tensor, nheads: int,
                      span: Optional[AdaptiveSpan], pers: Optional[PersistentMemory],
                      dropout: float, training: bool, plan: Optional[tuple] = None) -> torch.Tensor:
    """The function of ``reference_attention`` (up to the 1e-8 term, see the module doc) at a cost that
    follows each head's span: heads are grouped by ``plan_groups`` and each group is
    projected, scored and read over its own window W only (one group of every head
    over W = L' is the reference computation with only the kept positions projected).
    query (B, M, H), h_all (B, C+M, H) -> (B, M, H)."""
    B, M, H = query.shape
    L = key_pe.size(-1)
    K, D = nheads, H // nheads
    if plan is None:
        plan = attention_plan(span, K, L, B, M, D)
    keep, groups, order, windows = plan
    if groups == ((keep, M, slice(0, K)),) and h_all.size(1) == keep + M:
        # one dense group over L' and no cached position to skip: the reference itself
        return reference_attention(query, h_all, w_key, w_val, key_pe, nheads, span, pers,
                                   dropout, training, plan,
                                   outside_windows(windows, keep, query.device))
    q_all = split_heads(query, K)  # (B, K, M, D)
    wk = w_key.view(K, D, H)  # (K, D, H)
    wv = w_val.view(K, D, H)  # (K, D, H)
    mask_all = span.mask(L) if span is not None else None  # (K, 1, L)
    # widest group first; each narrower window is cut from the previous one, so that the
    # backward pass fills full-length (L+M) gradient buffers once, not once per group
    h = fit_memory(h_all, M, groups[-1][0])  # (B, W+M, H)
    pe, outs = key_pe[:, :, L - groups[-1][0]:], []  # (1, D, W)
    for window, chunk, heads in reversed(groups):
        h = h[:, h.size(1) - M - window:]  # (B, W+M, H)
        pe = pe[:, :, pe.size(-1) - window:]  # (1, D, W)
        q = _select(q_all, heads, 1)  # (B, G, M, D)
        G = q.size(1)
        mask = None
        if mask_all is not None:  # (K, 1, L), or (B, K, M, L) for a dynamic span
            mask = _select(mask_all, heads, mask_all.dim() - 3)[..., L - window:]  # (G, 1, W) or (B, G, M, W)
        wk_g = _select(wk, heads, 0).reshape(G * D, H)  # (G*D, H)
        wv_g = _select(wv, heads, 0).reshape(G * D, H)  # (G*D, H)
        unseen = outside_windows(windows[heads] if isinstance(heads, slice) else
                                 [windows[k] for k in heads], window, q.device)  # (G, 1, W) or None
        out = _group_attention(q, h, wk_g, wv_g, pe, mask, pers, heads, chunk, dropout, training,
                               unseen)
        outs.append(out.transpose(1, 2))  # (B, M, G, D)
    out = torch.cat(outs[::-1], dim=2) if len(outs) > 1 else outs[0]  # (B, M, K, D) in group order
    if order != tuple(range(K)):
        inverse = sorted(range(K), key=order.__getitem__)
        out = out.index_select(2, torch.tensor(inverse, device=out.device))  # (B, M, K, D)
    return out.reshape(B, M, H)  # (B, M, H)
