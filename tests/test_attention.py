"""Tests of attention.py: reference_attention against an explicit per-query loop
written from the formulas, the span mask against the paper, gradients, causality,
and grouped_attention against reference_attention (outputs and every gradient).

Dimension legend: B batch, M block length, L max span, C cached positions,
H hidden, K heads, D head dim, N persistent vectors.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_span import AdaptiveSpan  # noqa: E402
import attention  # noqa: E402
from attention import (grouped_attention, head_windows, reference_attention)  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from persistent_memory import PersistentMemory  # noqa: E402


# ---- helpers -------------------------------------------------------------------
def make_inputs(B, M, C, H, K, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, M, H, generator=g, dtype=dtype) / 2  # (B, M, H)
    h_all = torch.randn(B, C + M, H, generator=g, dtype=dtype)  # (B, C+M, H)
    w_key = torch.randn(H, H, generator=g, dtype=dtype) / math.sqrt(H)  # (H, H)
    w_val = torch.randn(H, H, generator=g, dtype=dtype) / math.sqrt(H)  # (H, H)
    key_pe = torch.randn(1, H // K, L, generator=g, dtype=dtype)  # (1, D, L)
    return [t.requires_grad_() for t in (query, h_all, w_key, w_val, key_pe)]


def make_span(L, K, vals, ramp=32, dtype=torch.float64):
    span = AdaptiveSpan(L, K, ramp=ramp).to(dtype)
    with torch.no_grad():
        span.current_val.copy_(torch.tensor(vals, dtype=dtype).view(K, 1, 1))
    return span


def make_pers(N, K, D, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return PersistentMemory(N, K, D).to(dtype)


def loop_attention(query, h_all, w_key, w_val, key_pe, K, span, pers, keep=None):
    """Per query i, head k: logits over distances d = 1..keep (default L; index C+i-d of h_all; a
    position before the start is a zero state), softmax (joint with persistent logits),
    mask clamp((R + z - x) / R, 0, 1) with x = d - 1, renormalise (sum + 1e-8)."""
    B, M, H = query.shape
    L = key_pe.size(-1)
    keep = L if keep is None else keep
    D = H // K
    C = h_all.size(1) - M
    key = h_all @ w_key.t()  # (B, C+M, H)
    val = h_all @ w_val.t()  # (B, C+M, H)
    out = torch.zeros(B, M, H, dtype=query.dtype)  # (B, M, H)
    for i in range(M):
        for k in range(K):
            cols = slice(k * D, (k + 1) * D)
            q = query[:, i, cols]  # (B, D)
            logits, values = [], []
            for d in range(1, keep + 1):
                j = C + i - d
                kj = key[:, j, cols] if j >= 0 else torch.zeros_like(q)  # (B, D)
                vj = val[:, j, cols] if j >= 0 else torch.zeros_like(q)  # (B, D)
                logits.append(((q * kj).sum(-1) + (q * key_pe[0, :, L - d]).sum(-1)) / math.sqrt(D))
                values.append(vj)
            logits = torch.stack(logits, -1)  # (B, keep), distance 1 first
            values = torch.stack(values, 1)  # (B, keep, D)
            if pers is not None:
                pk = pers.key[k] * math.sqrt(D)  # (D, N)
                pv = pers.val[k] * math.sqrt(pers.size)  # (N, D)
                logits = torch.cat([logits, (q @ pk) / math.sqrt(D)], -1)  # (B, keep+N)
            probs = torch.softmax(logits, -1)  # (B, keep) or (B, keep+N)
            ctx = probs[:, :keep]  # (B, keep)
            if span is not None:
                z = span.current_val[k, 0, 0] * L
                x = torch.arange(keep, dtype=query.dtype)  # (keep,)
                ctx = ctx * ((span.ramp + z - x) / span.ramp).clamp(0, 1)  # (B, keep)
                total = ctx.sum(-1, keepdim=True) + 1e-8  # (B, 1)
                if pers is not None:
                    total = total + probs[:, keep:].sum(-1, keepdim=True)  # (B, 1)
            else:
                total = torch.ones(B, 1, dtype=query.dtype)  # (B, 1)
            o = (ctx.unsqueeze(-1) * values).sum(1) / total  # (B, D)
            if pers is not None:
                o = o + (probs[:, keep:] / total) @ pv  # (B, D)
            out[:, i, cols] = o
    return out


# ---- (1) reference_attention against the loop ------------------------------------
@pytest.mark.parametrize("C", [0, 20, 64, 96])
@pytest.mark.parametrize("use_span,use_pers", [(False, False), (True, False), (True, True),
                                               (False, True)])
def test_reference_matches_loop(C, use_span, use_pers):
    B, M, H, K, L = 2, 5, 8, 2, 96
    args = make_inputs(B, M, C, H, K, L)
    # head 0 short (the layer is trimmed by 64), head 1 a little longer
    span = make_span(L, K, [0.05, 0.2], ramp=8) if use_span else None
    if span is not None:
        assert span.trim_len() == 64
    pers = make_pers(3, K, H // K) if use_pers else None
    ref = reference_attention(*args, K, span, pers, 0.0, False)
    # over all L positions: trimming drops only positions with mask 0, which changes
    # nothing but the 1e-8 term of the renormalisation
    torch.testing.assert_close(ref, loop_attention(*args, K, span, pers), rtol=0, atol=1e-6)
    keep = L - span.trim_len() if span is not None else L
    torch.testing.assert_close(ref, loop_attention(*args, K, span, pers, keep), rtol=0, atol=1e-12)


# ---- (2) mask against the paper --------------------------------------------------
@pytest.mark.parametrize("val", [0.0, 0.013, 0.25, 0.5, 1.0])
def test_mask_matches_paper(val):
    L, K, R = 64, 2, 16
    span = make_span(L, K, [val, 1 - val], ramp=R)
    mask = span.mask(L)  # (K, 1, L)
    for k in range(K):
        z = span.current_val[k, 0, 0].item() * L
        for j in range(L):
            x = L - 1 - j
            want = min(max((R + z - x) / R, 0.0), 1.0)
            assert abs(mask[k, 0, j].item() - want) < 1e-12
    torch.testing.assert_close(span.mask(20), mask[:, :, -20:])


# ---- (3) gradients reach current_val ----------------------------------------------
@pytest.mark.parametrize("impl", [reference_attention, grouped_attention])
def test_span_gradient_matches_finite_difference(impl):
    B, M, C, H, K, L = 1, 6, 40, 8, 2, 64
    args = [t.detach() for t in make_inputs(B, M, C, H, K, L)]
    span = make_span(L, K, [0.1031, 0.3517], ramp=8)
    weight = torch.randn(B, M, H, dtype=torch.float64)  # (B, M, H)

    cv = span.current_val.detach().clone().requires_grad_()
    del span._mask.current_val  # a plain tensor attribute, so autograd sees cv itself

    def loss(cv):
        span._mask.current_val = cv
        return (impl(*args, K, span, None, 0.0, False) * weight).sum()

    (grad,) = torch.autograd.grad(loss(cv), cv)
    assert grad.abs().min() > 0
    assert torch.autograd.gradcheck(loss, (cv,), eps=1e-6, atol=1e-6)


# ---- (4) causality ----------------------------------------------------------------
@pytest.mark.parametrize("impl", ["grouped", "reference"])
def test_future_tokens_never_change_the_past(impl):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, hidden_size=16, inner_hidden_size=32, nlayers=2, nheads=4,
                      attn_span=80, dropout=0.0, adapt_span=True, pers_mem_size=4,
                      pers_mem_keep_ff=True, attn_impl=impl)
    model = TransformerSeq(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.span.current_val.copy_(torch.tensor([0.0, 0.3, 0.9, 1.0]).view(4, 1, 1))
    x = torch.randint(0, 11, (2, 24))
    caches = [torch.randn_like(c) for c in model.init_cache(2)]
    with torch.no_grad():
        out, _ = model(x, caches)  # (B, M, V)
        for t in (0, 9, 23):
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % 11
            out2, _ = model(y, caches)  # (B, M, V)
            assert torch.equal(out[:, :t], out2[:, :t])
            assert not torch.allclose(out[:, t], out2[:, t])


# ---- (5) grouped == reference -----------------------------------------------------
# The two paths compute the same function but for the 1e-8 of the renormalisation, which
# is added after softmaxes over different key sets (the reference's L', the head's own
# window). With a = the softmax mass a head keeps inside its span (joint with the persistent
# vectors), the outputs and each gradient tensor differ by at most 8e-8 / a of the tensor's
# largest entry (the tolerance below: atol + rtol * |entry|, both 4e-8 / a). The comparison runs in float64 (rounding ~1e-15) and the tolerance is
# derived from a, measured on the same inputs: so agreement is asserted wherever it is
# predicted, and float32 rounding (which depends on the torch version) plays no part.
def kept_mass(args, K, span, pers) -> float:
    """min over batch, heads and queries of the reference's masked softmax mass (heads
    whose mask is all zero excluded)."""
    query, h_all, w_key, w_val, key_pe = (t.detach() for t in args)
    B, M, H = query.shape
    L, D = key_pe.size(-1), H // K
    keep = span.kept_len() if span is not None else L
    key = attention.fit_memory(h_all @ w_key.t(), M, keep)  # (B, L'+M, H)
    q, k = attention.split_heads(query, K), attention.split_heads(key, K)  # (B,K,M,D), (B,K,L'+M,D)
    logits = attention.unskew(q @ k.transpose(-1, -2)) + q @ key_pe[:, :, L - keep:]  # (B, K, M, L')
    if pers is not None:
        logits = torch.cat([logits, pers.logits(q).detach()], -1)  # (B, K, M, L'+N)
    probs = torch.softmax(logits / math.sqrt(D), -1)[..., :keep]  # (B, K, M, L')
    mask = span.mask(keep).detach() if span is not None else 1.0  # (K, 1, L')
    mass = (probs * mask).sum(-1)  # (B, K, M)
    return mass[mass > 0].min().item()  # a head with an all-zero mask outputs 0 on both paths


def _compare(B, M, C, H, K, L, vals, n_pers, ramp=32, seed=0, dtype=torch.float64):
    args = make_inputs(B, M, C, H, K, L, dtype=dtype, seed=seed)
    span = make_span(L, K, vals, ramp=ramp, dtype=dtype) if vals is not None else None
    pers = make_pers(n_pers, K, H // K, dtype=dtype) if n_pers else None
    params = list(args)
    if span is not None:
        params.append(span.current_val)
    if pers is not None:
        params += [pers.key, pers.val]
    weight = torch.randn(B, M, H, generator=torch.Generator().manual_seed(seed + 7), dtype=dtype)  # (B, M, H)
    results = []
    for impl in (reference_attention, grouped_attention):
        out = impl(*args, K, span, pers, 0.0, True)  # (B, M, H)
        grads = torch.autograd.grad((out * weight).sum(), params)
        results.append((out, grads))
    (ref, ref_grads), (got, got_grads) = results
    rel = 4e-8 / kept_mass(args, K, span, pers) if dtype == torch.float64 else 1e-4
    for g_got, g_ref in zip((got, *got_grads), (ref, *ref_grads)):
        torch.testing.assert_close(g_got, g_ref, rtol=rel, atol=rel * g_ref.abs().max().item() + 1e-12)
    return rel


def _vals_for_spans(spans, L, R=32, exact=False):
    """current_val giving head_spans() == spans: z in (s - R - 1, s - R]."""
    return [(s - R - (0.0 if exact else 0.5)) / L for s in spans]


@pytest.mark.parametrize("M", [37, 100, 64])
@pytest.mark.parametrize("C", [0, 50, 256, 300])
@pytest.mark.parametrize("n_pers", [0, 5])
def test_grouped_matches_reference_random_spans(M, C, n_pers):
    K, L = 6, 256
    vals = torch.rand(K, generator=torch.Generator().manual_seed(M + C)).tolist()
    vals[1] = 0.0  # span 0 (ramp only)
    vals[4] = 1.0  # at max
    _compare(2, M, C, 24, K, L, vals, n_pers, seed=C)
    _compare(2, M, C, 24, K, L, vals, n_pers, seed=C, dtype=torch.float32)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("n_pers", [0, 3])
def test_grouped_matches_reference_bucket_edges(exact, n_pers):
    K, L = 8, 320
    spans = [63, 64, 65, 127, 128, 129, 32, 64]
    vals = _vals_for_spans(spans, L, exact=exact)
    span = make_span(L, K, vals)
    if not exact:
        assert span.head_spans() == spans
    _compare(2, 37, 200, 32, K, L, vals, n_pers)
    _compare(1, 130, 320, 32, K, L, vals, n_pers)


def test_grouped_matches_reference_edge_values():
    """All heads short (trimmed layer), all at max, a negative value, no adaptive span."""
    K, L = 4, 192
    for vals in ([0.0] * K, [1.0] * K, [-0.2, 0.0, 0.5, 0.1], None):
        _compare(2, 40, 192, 16, K, L, vals, 0)
        _compare(2, 40, 100, 16, K, L, vals, 4)


@pytest.mark.parametrize("vals", [[1.0, 1.0, 1.0], None])
def test_grouped_is_the_reference_when_every_head_needs_the_whole_span(vals):
    K, L = 3, 128
    args = make_inputs(2, 20, 100, 12, K, L, dtype=torch.float32)
    span = make_span(L, K, vals, dtype=torch.float32) if vals is not None else None
    ref = reference_attention(*args, K, span, None, 0.0, False)
    assert torch.equal(grouped_attention(*args, K, span, None, 0.0, False), ref)


def test_head_windows_cover_every_nonzero_mask_and_gradient():
    L, K = 512, 5
    span = make_span(L, K, [0.0, 32 / L, 0.3, 1.0, -1.0])
    windows = head_windows(span, K, L)
    mask = span.mask(L)  # (K, 1, L)
    for k, w in enumerate(windows):
        assert w % 64 == 0 or w == L - span.trim_len()
        assert mask[k, 0, : L - w].abs().sum() == 0  # nothing non-zero outside the window
    # z = 32 exactly: position x = z + R has mask 0 but passes gradient, so it is kept
    assert windows[:2] == [64, 128]


# ---- model level -------------------------------------------------------------------
def _model(impl, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=13, hidden_size=16, inner_hidden_size=24, nlayers=2, nheads=4,
                      attn_span=192, dropout=0.0, adapt_span=True, adapt_span_cache=True,
                      pers_mem_size=3, pers_mem_keep_ff=True, attn_impl=impl)
    model = TransformerSeq(cfg)
    with torch.no_grad():
        for layer, vals in zip(model.layers, ([0.1, 0.0, 0.6, 0.2], [0.3, 0.05, 0.05, 0.01])):
            layer.span.current_val.copy_(torch.tensor(vals).view(4, 1, 1))
    return model


def test_model_grouped_matches_reference_over_blocks():
    x = torch.randint(0, 13, (2, 3 * 37 + 1), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for impl in ("reference", "grouped"):
        model = _model(impl)
        caches = model.init_cache(2)
        total = 0
        for p in range(0, 3 * 37, 37):
            nll, caches = model(x[:, p:p + 37], caches, x[:, p + 1:p + 38])  # (B, M)
            total = total + nll.mean()
        total.backward()
        losses.append(total.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for g_got, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-5)


def test_model_batch_split_equals_full_batch():
    model = _model("grouped")
    x = torch.randint(0, 13, (4, 41), generator=torch.Generator().manual_seed(4))
    caches = [torch.randn_like(c) for c in model.init_cache(4)]
    nll, next_caches = model(x[:, :40], caches, x[:, 1:])  # (B, M)
    nll.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        part, part_caches = model(x[rows, :40], [c[rows] for c in caches], x[rows, 1:])  # (B/2, M)
        part.sum().backward()
        torch.testing.assert_close(part, nll[rows], rtol=1e-5, atol=1e-5)
        for c_part, c_full in zip(part_caches, next_caches):
            torch.testing.assert_close(c_part, c_full[rows], rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), full_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


# ---- the cost model's plan ------------------------------------------------------------
def test_plan_is_the_dense_product_when_every_head_needs_the_kept_span():
    groups, order = attention.plan_groups((256,) * 4, 8, 128, 32)
    assert groups == ((256, 128, slice(0, 4)),) and order == (0, 1, 2, 3)


def test_plan_splits_one_long_head_from_short_ones_and_covers_every_head_once():
    windows = (64, 64, 8192, 64, 128, 128, 64, 64)
    groups, order = attention.plan_groups(windows, 4, 512, 64)
    assert groups[-1][0] == 8192 and groups[-1][2] == slice(2, 3)  # the long head alone
    assert sorted(order) == list(range(8))
    for window, chunk, heads in groups:
        members = range(8)[heads] if isinstance(heads, slice) else heads
        assert all(windows[k] <= window for k in members)  # a head is never scored short
        assert 64 <= chunk <= 512


def test_plan_uses_only_the_shapes():
    """The same shapes always give the same plan (a formula, never a timing)."""
    attention.plan_groups.cache_clear()
    first = attention.plan_groups((64, 128, 128, 512), 2, 256, 32)
    attention.plan_groups.cache_clear()
    assert attention.plan_groups((64, 128, 128, 512), 2, 256, 32) == first
