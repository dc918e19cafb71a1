"""Dynamic spans in the language model (--adapt-span-dynamic): with v = 0 the static span
z = L * sigmoid(b), gradients of v and b against finite differences, windows and FLOPs at the
spans actually used, and a run that trains, evaluates and resumes exactly.

Dimension legend: B batch, M block length, L max span, K heads, V vocabulary.
"""
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flops  # noqa: E402
import main  # noqa: E402
from adaptive_span import head_window  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from numeric import assert_matches_finite_differences  # noqa: E402

V, L, K = 20, 256, 4


def model_pair(impl: str):
    """A dynamic model with v = 0 and the static model with current_val = sigmoid(b)."""
    cfg = dict(vocab_size=V, hidden_size=32, inner_hidden_size=64, nlayers=2, nheads=K,
               attn_span=L, dropout=0.0, adapt_span=True, adapt_span_ramp=16, attn_impl=impl)
    torch.manual_seed(0)
    dyn = TransformerSeq(ModelConfig(adapt_span_dynamic=True, **cfg)).double()
    static = TransformerSeq(ModelConfig(**cfg)).double()
    b = torch.tensor([[-4.0, -2.5, -1.0, 0.5], [-3.0, -0.3, -2.0, 1.5]], dtype=torch.float64)
    state = {k: v for k, v in dyn.state_dict().items() if "span_logit" not in k}
    for layer in range(2):
        prefix = f"layers.{layer}.attn.attn.adaptive_span."
        with torch.no_grad():
            dyn.state_dict()[prefix + "span_logit.bias"].copy_(b[layer])
        state[prefix + "_mask.current_val"] = torch.sigmoid(b[layer]).view(K, 1, 1)
        state[prefix + "_mask.mask_template"] = static.state_dict()[prefix + "_mask.mask_template"]
    static.load_state_dict(state)
    return dyn.eval(), static.eval()


def nll_of_blocks(model, x, block=32):
    caches, out = [c.double() for c in model.init_cache(x.size(0))], []
    for start in range(0, x.size(1) - 1, block):
        nll, caches = model(x[:, start:start + block], caches, x[:, start + 1:start + block + 1])  # (B, M)
        out.append(nll)
    return torch.cat(out, 1)  # (B, T)


@pytest.mark.parametrize("impl", ["grouped", "reference"])
def test_zero_v_is_the_static_span(impl):
    dyn, static = model_pair(impl)
    x = torch.randint(0, V, (2, 161))  # (B, T)
    torch.testing.assert_close(nll_of_blocks(dyn, x), nll_of_blocks(static, x), rtol=0, atol=1e-10)
    assert dyn.head_spans() == static.head_spans()
    assert [layer.span.head_windows() for layer in dyn.layers] == \
        [layer.span.head_windows() for layer in static.layers]
    # FLOPs are counted at the windows the last block used
    assert flops.flops_per_token(dyn).attn == flops.flops_per_token(static).attn


def test_windows_follow_the_largest_span_of_the_block():
    dyn, _ = model_pair("grouped")
    with torch.no_grad():
        for layer in dyn.layers:
            layer.span.span_logit.weight.normal_(0, 2.0)
    x = torch.randint(0, V, (2, 32))  # (B, M)
    dyn(x, [c.double() for c in dyn.init_cache(2)])
    for layer in dyn.layers:
        span = layer.span
        z_max = span._z.detach().amax((0, 1))  # (K,)
        reach = [min(L, math.floor(16 + z) + 1) for z in z_max.tolist()]
        assert span.head_windows() == [head_window(r, span.kept_len()) for r in reach]
        assert span.cache_size() == L


def test_gradient_of_v_and_b_matches_finite_differences():
    dyn, _ = model_pair("grouped")
    dyn.cfg.adapt_span_loss = 0.0
    for layer in dyn.layers:
        layer.span.loss_coeff = 1e-3
        with torch.no_grad():
            layer.span.span_logit.weight.normal_(0, 0.3)
    x = torch.randint(0, V, (2, 65))  # (B, T)

    def loss():  # one block: the caches (detached, as in training) carry no gradient
        return nll_of_blocks(dyn, x, block=64).mean() + dyn.span_loss()

    span = dyn.layers[1].span.span_logit
    params = [span.weight, span.bias, dyn.layers[0].span.span_logit.bias]
    assert_matches_finite_differences(loss, params, stride=11, atol=1e-6, rtol=1e-4)


def english_like(n_bytes: int, seed: int = 0) -> bytes:
    """Seeded sentences from a small vocabulary, with a repeated phrase far back."""
    rng = random.Random(seed)
    words = ("the of and to in is was for on with as by at from that this which an are "
             "span head attention model memory layer token learns short long").split()
    out = []
    while sum(len(w) + 1 for w in out) < n_bytes:
        out.extend(rng.choice(words) for _ in range(rng.randint(4, 12)))
        out[-1] += "."
    return " ".join(out).encode()[:n_bytes]


def test_dynamic_spans_train_evaluate_and_resume(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_bytes(english_like(60_000))
    flags = ["--data", text, "--nlayers", 2, "--hid-sz", 32, "--inner-hid-sz", 64, "--nheads", 2,
             "--attn-span", 128, "--block-sz", 32, "--batch-sz", 8, "--optim", "adagrad",
             "--lr", 0.07, "--grad-clip", 0.03, "--dropout", 0, "--adapt-span",
             "--adapt-span-dynamic", "--adapt-span-loss", 2e-6, "--nbatches", 15]
    flags = [str(f) for f in flags]
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    assert main.main(flags + ["--niter", "3", "--checkpoint", str(straight)]) == 0
    log = capsys.readouterr().out
    bpc = [float(v) for v in re.findall(r"^steps: \d+ train: ([\d.]+)bpc", log, re.M)]
    assert len(bpc) == 3 and bpc[-1] < bpc[0] < 8.5
    assert re.search(r"span_avg: [\d.]+ span_max: \d+", log)
    assert main.main(flags + ["--niter", "2", "--checkpoint", str(resumed)]) == 0
    assert main.main(flags + ["--niter", "3", "--checkpoint", str(resumed)]) == 0
    a = torch.load(straight, weights_only=True)["model"]
    b = torch.load(resumed, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("span_logit.weight" in k for k in a)
    capsys.readouterr()
    assert main.main(["--checkpoint", str(straight), "--full-eval-mode", "--batch-sz", "4"]) == 0
    found = re.findall(r"^(val|test): (\d+\.\d{4})bpc", capsys.readouterr().out, re.M)
    assert [name for name, _ in found] == ["val", "test"]
    assert all(float(v) < 8.0 for _, v in found)


def test_dynamic_span_needs_adaptive_span(capsys):
    assert main.main(["--adapt-span-dynamic", "--dry-run", "--vocab-size", "10"]) == 2
    assert "--adapt-span-dynamic needs --adapt-span" in capsys.readouterr().err
