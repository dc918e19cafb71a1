"""Adaptive input / projected adaptive softmax against explicit per-token
computations written from the formulas, plus tying, DDP-safety and training."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_io import (AdaptiveInput, ProjectedAdaptiveLogSoftmax,  # noqa: E402
                         build_adaptive_io, cluster_bounds)
from models import ModelConfig, TransformerSeq, from_reference_state_dict  # noqa: E402

V, H, CUTOFFS, DIV = 50, 16, [10, 20, 35], 2
BOUNDS = [0, 10, 20, 35, 50]


def small_io(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    in_emb, out_emb = build_adaptive_io(V, H, CUTOFFS, DIV, tied)
    return in_emb.double(), out_emb.double()


def cluster_of(w: int) -> int:
    return max(i for i in range(4) if w >= BOUNDS[i])


def dense_log_prob(out_emb: ProjectedAdaptiveLogSoftmax, h: torch.Tensor, w: int) -> float:
    """log p(w | h) for one hidden vector h (H,), from the formulas."""
    W = [layer.weight for layer in out_emb.out_layers]
    b = [layer.bias for layer in out_emb.out_layers]
    P = list(out_emb.out_projs)
    z0 = h @ P[0]  # (H,)
    head = torch.cat([z0 @ W[0].t() + b[0],
                      z0 @ out_emb.cluster_proj.weight.t() + out_emb.cluster_proj.bias])  # (10 + 3,)
    head = head - torch.logsumexp(head, 0)
    i = cluster_of(w)
    if i == 0:
        return head[w].item()
    tail = (h @ P[i]) @ W[i].t() + b[i]  # (S_i,)
    tail = tail - torch.logsumexp(tail, 0)
    # tail cluster i reads head column -i: cluster 1 -> last column, cluster 3 -> first
    return (head[BOUNDS[1] + 3 - i] + tail[w - BOUNDS[i]]).item()


def test_cluster_layout():
    in_emb, out_emb = small_io(tied=False)
    assert [e.weight.shape for e in in_emb.emb_layers] == [(10, 16), (10, 8), (15, 4), (15, 2)]
    assert [p.shape for p in in_emb.emb_projs] == [(16, 16), (16, 8), (16, 4), (16, 2)]
    assert [l.weight.shape for l in out_emb.out_layers] == [(10, 16), (10, 8), (15, 4), (15, 2)]
    assert out_emb.cluster_proj.weight.shape == (3, 16)
    with pytest.raises(ValueError):
        cluster_bounds(50, [10, 10, 35])
    with pytest.raises(ValueError):
        cluster_bounds(50, [10, 20, 50])


def test_adaptive_input_matches_formula():
    in_emb, _ = small_io(tied=False)
    x = torch.tensor([[0, 9, 10, 19], [20, 34, 35, 49], [3, 3, 48, 21]])
    out = in_emb(x)  # (3, 4, H)
    for (r, c), w in zip(torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist(), x.view(-1).tolist()):
        i = cluster_of(w)
        want = math.sqrt(H) * in_emb.emb_projs[i] @ in_emb.emb_layers[i].weight[w - BOUNDS[i]]
        torch.testing.assert_close(out[r, c], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_log_prob_normalised_and_matches_dense(tied):
    _, out_emb = small_io(tied, seed=1)
    h = torch.randn(3, 5, H, dtype=torch.float64)
    lp = out_emb.log_prob(h)  # (3, 5, V)
    assert lp.shape == (3, 5, V)
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    for w in range(V):
        assert lp[1, 2, w].item() == pytest.approx(dense_log_prob(out_emb, h[1, 2], w), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_nll_matches_dense(tied):
    _, out_emb = small_io(tied, seed=2)
    # every cluster hit, one of them (cluster 3) by a single token
    target = torch.tensor([[0, 9, 10, 19, 20], [34, 49, 5, 12, 33]])
    h = torch.randn(2, 5, H, dtype=torch.float64)
    nll = out_emb(h, target)  # (2, 5)
    assert nll.shape == target.shape
    for r in range(2):
        for c in range(5):
            want = -dense_log_prob(out_emb, h[r, c], target[r, c].item())
            assert nll[r, c].item() == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(-out_emb.log_prob(h).gather(-1, target[..., None])[..., 0], nll.double())


def test_tying_shares_storage_and_training_the_output_moves_the_input():
    in_emb, out_emb = small_io(tied=True, seed=3)
    for i in range(4):
        assert out_emb.out_layers[i].weight is in_emb.emb_layers[i].weight
        assert out_emb.out_projs[i].data_ptr() == in_emb.emb_projs[i].data_ptr()
        assert out_emb.out_layers[i].bias.data_ptr() != in_emb.emb_layers[i].weight.data_ptr()
    n_unique = sum(p.numel() for p in set(in_emb.parameters()) | set(out_emb.parameters()))
    assert n_unique == sum(p.numel() for p in in_emb.parameters()) + 3 * 16 + 3 + V
    x = torch.tensor([[1, 15, 30, 40]])
    before = in_emb(x).detach().clone()
    opt = torch.optim.SGD(out_emb.parameters(), lr=0.1)
    out_emb(torch.randn(4, H, dtype=torch.float64), torch.tensor([2, 12, 25, 44])).sum().backward()
    opt.step()
    after = in_emb(x).detach()
    assert (after - before).abs().amax(-1).min() > 1e-6  # every cluster's input embedding moved
    untied_in, untied_out = small_io(tied=False)
    assert untied_out.out_projs[0].data_ptr() != untied_in.emb_projs[0].data_ptr()


def tiny_model(tied: bool, seed: int = 0, **kw) -> TransformerSeq:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, hidden_size=H, nheads=2, nlayers=2, attn_span=8,
                      inner_hidden_size=32, dropout=0.0, adapt_io=True, adapt_io_tied=tied,
                      adapt_io_cutoffs=list(CUTOFFS), adapt_io_divval=DIV, **kw)
    return TransformerSeq(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_gets_a_gradient_with_shortlist_only_batch(tied):
    model = tiny_model(tied)
    x = torch.randint(0, 10, (2, 6))
    y = torch.randint(0, 10, (2, 6))
    nll, _ = model(x, model.init_cache(2), y)
    nll.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert model.in_emb.emb_layers[3].weight.grad.abs().sum() == 0
    if not tied:
        assert model.out_emb.out_layers[2].bias.grad.abs().sum() == 0


def test_model_forward_nll_equals_log_prob_gather():
    model = tiny_model(tied=True).eval()
    x = torch.randint(0, V, (2, 6))
    y = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        nll, caches = model(x, model.init_cache(2), y)
        lp, _ = model(x, model.init_cache(2))
    assert lp.shape == (2, 6, V) and nll.shape == (2, 6)
    torch.testing.assert_close(-lp.gather(-1, y[..., None])[..., 0], nll, rtol=1e-5, atol=1e-5)
    assert [c.shape for c in caches] == [(2, 8, H)] * 2


def test_bfloat16_autocast_forward_and_backward():
    model = tiny_model(tied=True, seed=7)
    x = torch.randint(0, V, (2, 6))
    y = torch.randint(0, V, (2, 6))
    want, _ = model(x, model.init_cache(2), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = model(x, model.init_cache(2), y)
    assert got.dtype == torch.float32  # log-softmax and NLL are kept in float32
    got.mean().backward()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_state_dict_round_trip_and_reference_names():
    src = tiny_model(tied=True, seed=4)
    state = src.state_dict()
    assert "in_emb.emb_layers.1.weight" in state and "out_emb.out_layers.1.weight" in state
    ref_style = {"module." + k: v for k, v in state.items()}
    one_name = {k: v for k, v in ref_style.items() if not k.startswith("module.out_emb.out_projs.")
                and not (k.startswith("module.out_emb.out_layers.") and k.endswith(".weight"))}
    x = torch.randint(0, V, (1, 6))
    src.eval()
    want = src(x, src.init_cache(1))[0]
    for sd in (state, from_reference_state_dict(ref_style), from_reference_state_dict(one_name)):
        dst = tiny_model(tied=True, seed=5).eval()
        dst.load_state_dict(sd)
        assert dst.out_emb.out_projs[2] is dst.in_emb.emb_projs[2]
        torch.testing.assert_close(dst(x, dst.init_cache(1))[0], want, rtol=0, atol=0)
    bad = dict(state)
    bad["out_emb.out_projs.2"] = bad["out_emb.out_projs.2"] + 1
    with pytest.raises(RuntimeError, match="tied adaptive-I/O tensors differ"):
        tiny_model(tied=True).load_state_dict(bad)


def test_training_reduces_loss():
    model = tiny_model(tied=True, seed=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (4, 8), generator=g)
    y = torch.randint(0, V, (4, 8), generator=g)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        nll, _ = model(x, model.init_cache(4), y)
        loss = nll.mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(math.isfinite(v) for v in losses)


def test_wiki103_pers_parameter_count():
    cfg = ModelConfig(vocab_size=267735, hidden_size=512, inner_hidden_size=1, nlayers=36, nheads=8,
                      attn_span=2048, pers_mem_size=2048, adapt_span=True, adapt_io=True,
                      adapt_io_tied=True, adapt_io_divval=4, adapt_io_cutoffs=[20000, 40000, 200000])
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = TransformerSeq(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == 132.49
    emb = 20000 * 512 + 20000 * 128 + 160000 * 32 + 67735 * 8 + 512 * (512 + 128 + 32 + 8)
    assert sum(p.numel() for p in model.in_emb.parameters()) == emb
    assert AdaptiveInput is type(model.in_emb)
