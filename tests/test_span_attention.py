"""Tests of the drop-in AdaptiveSpanAttention (span_attention.py): against a dense
computation written from the paper's formulas, causality and padding exactly, the
cost following the spans, dynamic spans (finite differences, v = 0 is static), and a
small GPT-style model of the test's own that learns on generated text.

Dimension legend: B batch, T sequence length, H hidden, K heads, D head dim, L max span,
V vocabulary.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import span_attention  # noqa: E402
from span_attention import AdaptiveSpanAttention  # noqa: E402
from numeric import assert_matches_finite_differences  # noqa: E402


def dense(attn: AdaptiveSpanAttention, x: torch.Tensor, pad=None) -> torch.Tensor:
    """Every query against every key s <= t with t - s < L: softmax over the real keys,
    times clamp((R + z - d) / R, 0, 1), renormalised (sum + 1e-8)."""
    B, T, H = x.shape
    K, D, L, R = attn.nheads, attn.head_dim, attn.max_span, attn.ramp
    q, k, v = attn.qkv(x).view(B, T, 3, K, D).permute(2, 0, 3, 1, 4)  # 3 x (B, K, T, D)
    t = torch.arange(T)
    d = t.view(T, 1) - t.view(1, T)  # (T, T) distance query - key
    allowed = (d >= 0) & (d < L)  # (T, T)
    pe = attn.key_pe[0, :, (L - 1 - d).clamp(0, L - 1)]  # (D, T, T)
    logits = q @ k.transpose(-1, -2) + torch.einsum("bktd,dts->bkts", q, pe)  # (B, K, T, T)
    keep = allowed.expand(B, 1, T, T)  # (B, 1, T, T)
    if pad is not None:
        keep = keep & ~pad.view(B, 1, 1, T)  # (B, 1, T, T)
    logits = (logits / math.sqrt(D)).masked_fill(~keep, float("-inf"))  # (B, K, T, T)
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # (B, K, T, T)
    if attn.dynamic:
        z = L * torch.sigmoid(attn.span.span_logit(x)).transpose(1, 2).unsqueeze(-1)  # (B, K, T, 1)
    else:
        z = (attn.span.current_val * L).view(1, K, 1, 1)  # (1, K, 1, 1)
    probs = probs * ((R + z - d.to(x.dtype)) / R).clamp(0, 1)  # (B, K, T, T)
    probs = probs / (probs.sum(-1, keepdim=True) + 1e-8)  # (B, K, T, T)
    out = (probs @ v).transpose(1, 2).reshape(B, T, H)  # (B, T, H)
    return attn.out(out)  # (B, T, H)


def make(H=16, K=4, L=200, ramp=8, vals=(0.02, 0.3, 0.6, 1.0), dynamic=False, seed=0):
    torch.manual_seed(seed)
    attn = AdaptiveSpanAttention(H, K, L, ramp=ramp, dynamic=dynamic).double()
    vals = torch.tensor(vals, dtype=torch.float64)
    with torch.no_grad():
        if dynamic:
            attn.span.span_logit.weight.normal_(0, 0.5)
            attn.span.span_logit.bias.copy_(torch.logit(vals.clamp(0.01, 0.99)))
        else:
            attn.span.current_val.copy_(vals.view(K, 1, 1))
    return attn


@pytest.mark.parametrize("T", [7, 150, 300])
@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_dense_computation(T, dynamic):
    attn = make(dynamic=dynamic)
    x = torch.randn(2, T, 16, dtype=torch.float64)  # (B, T, H)
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[1, : T // 3] = True  # left padding in the second row
    # the two differ only through the 1e-8 of the renormalisation, which the dense softmax
    # weighs against all L keys and the banded one against the window: ~1e-8 / in-span mass
    torch.testing.assert_close(attn(x), dense(attn, x), rtol=0, atol=2e-7)
    got, want = attn(x, pad), dense(attn, x, pad)  # (B, T, H)
    torch.testing.assert_close(got[~pad], want[~pad], rtol=0, atol=2e-7)


def test_gradients_match_dense_computation():
    attn = make()
    x = torch.randn(2, 140, 16, dtype=torch.float64, requires_grad=True)  # (B, T, H)
    w = torch.randn(2, 140, 16, dtype=torch.float64)  # (B, T, H)
    grads = torch.autograd.grad((attn(x) * w).sum(), [x, *attn.parameters()])
    want = torch.autograd.grad((dense(attn, x) * w).sum(), [x, *attn.parameters()])
    for g, e in zip(grads, want):  # the 1e-8 term again; summed gradients (current_val) carry it
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_causal_exactly():
    attn = make(dynamic=True)
    x = torch.randn(1, 130, 16, dtype=torch.float64)  # (B, T, H)
    y = x.clone()
    y[:, 90:] = torch.randn(1, 40, 16, dtype=torch.float64)  # a different future
    assert torch.equal(attn(x)[:, :90], attn(y)[:, :90])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_do_not_matter(side):
    attn = make(dynamic=True)
    x = torch.randn(2, 100, 16, dtype=torch.float64)  # (B, T, H)
    pad = torch.zeros(2, 100, dtype=torch.bool)
    pad[0, :30] = side == "left"
    pad[0, 70:] = side == "right"
    y = x.clone()
    y[pad] = 1e3 * torch.randn(int(pad.sum()), 16, dtype=torch.float64)  # garbage in the padding
    out_x, out_y = attn(x, pad), attn(y, pad)  # (B, T, H)
    assert torch.equal(out_x[~pad], out_y[~pad])
    assert torch.isfinite(out_y).all()
    # a left-padded row computes what the unpadded sequence computes
    real = x[0, 30:] if side == "left" else x[0, :70]  # (T', H)
    alone = attn(real.unsqueeze(0))[0]  # (T', H)
    torch.testing.assert_close(out_x[0][~pad[0]], alone, rtol=0, atol=1e-10)


def test_cost_follows_the_spans(monkeypatch):
    """Each group of heads is scored over its own window only: the band widths used are the
    heads' windows (spans + ramp rounded up to 64), not the sequence length."""
    attn = make(L=1024, vals=(0.01, 0.01, 0.1, 0.2))  # z = 10, 10, 102, 205 (+ ramp 8)
    widths = []
    real = span_attention.band_logits

    def spy(q, k, chunk):
        widths.append((q.size(1), k.size(2) - q.size(2)))  # (heads, window)
        return real(q, k, chunk)

    monkeypatch.setattr(span_attention, "band_logits", spy)
    attn(torch.randn(1, 600, 16, dtype=torch.float64))
    assert sorted(widths) == [(1, 128), (1, 256), (2, 64)]
    assert attn.head_spans() == [19, 19, 111, 213]


def test_dynamic_with_zero_v_is_the_static_span():
    torch.manual_seed(0)
    dyn = AdaptiveSpanAttention(16, 4, 200, ramp=8, dynamic=True).double()
    static = AdaptiveSpanAttention(16, 4, 200, ramp=8).double()
    b = torch.tensor([-3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    with torch.no_grad():
        dyn.span.span_logit.bias.copy_(b)
        static.load_state_dict({k: v for k, v in dyn.state_dict().items() if "span_logit" not in k},
                               strict=False)
        static.span.current_val.copy_(torch.sigmoid(b).view(4, 1, 1))
    x = torch.randn(2, 180, 16, dtype=torch.float64)  # (B, T, H)
    torch.testing.assert_close(dyn(x), static(x), rtol=0, atol=1e-12)
    dyn.span.loss_coeff = static.span.loss_coeff = 0.5
    torch.testing.assert_close(dyn.span_loss(), static.span_loss())
    torch.testing.assert_close(dyn.span_loss(), 0.5 * (200 * torch.sigmoid(b)).mean())
    assert dyn.head_spans() == static.head_spans()


def test_dynamic_gradient_matches_finite_differences():
    attn = make(dynamic=True, L=100, vals=(0.1, 0.2, 0.3, 0.5))
    attn.span.loss_coeff = 0.01
    x = torch.randn(2, 60, 16, dtype=torch.float64)  # (B, T, H)
    w = torch.randn(2, 60, 16, dtype=torch.float64)  # (B, T, H)

    def loss():
        return (attn(x) * w).sum() + attn.span_loss()

    params = [attn.span.span_logit.weight, attn.span.span_logit.bias]
    assert_matches_finite_differences(loss, params, stride=7, atol=1e-5, rtol=1e-5)


# ---- a GPT-style model that is not ours ------------------------------------------------
class Block(nn.Module):
    def __init__(self, H, K, L, dynamic):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.attn = AdaptiveSpanAttention(H, K, L, ramp=8, loss_coeff=2e-3, dynamic=dynamic)
        self.mlp = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H))

    def forward(self, x, pad):
        x = x + self.attn(self.ln1(x), key_padding_mask=pad)  # (B, T, H)
        return x + self.mlp(self.ln2(x))  # (B, T, H)


class TinyGPT(nn.Module):
    def __init__(self, V=12, H=32, K=4, L=64, n=2, dynamic=False):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(Block(H, K, L, dynamic) for _ in range(n))
        self.head = nn.Linear(H, V)

    def forward(self, ids, pad=None):
        x = self.emb(ids)  # (B, T, H)
        for block in self.blocks:
            x = block(x, pad)  # (B, T, H)
        return self.head(x)  # (B, T, V)


@pytest.mark.parametrize("dynamic", [False, True])
def test_trains_inside_a_gpt_style_model(dynamic):
    """Sequences that repeat a random 6-token motif: the next token is predictable from 6 back.
    Right padding in half the rows. The loss falls, spans move, every parameter gets a gradient."""
    torch.manual_seed(0)
    model = TinyGPT(dynamic=dynamic)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    spans_before = [b.attn.head_spans() for b in model.blocks]
    losses = []
    for step in range(60):
        motif = torch.randint(0, 10, (16, 6))  # (B, 6)
        ids = motif.repeat(1, 8)  # (B, 48)
        pad = torch.zeros(16, 48, dtype=torch.bool)
        pad[8:, 40:] = True
        logits = model(ids[:, :-1], pad[:, :-1])  # (B, 47, V)
        target = ids[:, 1:].masked_fill(pad[:, 1:], -100)  # (B, 47)
        loss = F.cross_entropy(logits.reshape(-1, 12), target.reshape(-1), ignore_index=-100)
        total = loss + sum(b.attn.span_loss() for b in model.blocks)
        opt.zero_grad()
        total.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            if not dynamic:
                assert missing == []
            else:
                assert missing == []
        opt.step()
        for b in model.blocks:
            b.attn.clamp_spans()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    if dynamic:
        assert any(b.attn.span.span_logit.weight.abs().sum() > 0 for b in model.blocks)
    else:
        assert [b.attn.head_spans() for b in model.blocks] != spans_before
