"""The accuracy statements of docs/evaluation.md, over the cases they name: a head's softmax
runs over its own window whatever group the planner scores it in, so cached generation,
token-by-token and blockwise scoring, and any batch size agree to float rounding, also with
adaptive input/softmax and a head that keeps almost no mass inside its span (where the
renormalisation's 1e-8 dominates). Float32 to 1e-5 (plus 1e-6 of the value), float64 to 1e-10.

Dimension legend: B batch, T tokens, M block length, V vocabulary, K heads, H hidden.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import attention_plan  # noqa: E402
from inference import KVCache  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from span_attention import AdaptiveSpanAttention  # noqa: E402

L, R = 300, 16
TINY = (1e-4 - R) / L  # z = 1e-4 - R: the nearest key's mask is 6e-6, the kept mass ~1e-8
SPANS = [TINY, 0.05, 0.2, 0.7]  # windows 64, 64, 128, 256 (L' = 300)


def low_mass_model(dtype=torch.float32, **overrides) -> TransformerSeq:
    torch.manual_seed(3)
    cfg = dict(vocab_size=300, hidden_size=32, inner_hidden_size=48, nlayers=2, nheads=4,
               attn_span=L, dropout=0.0, adapt_span=True, adapt_span_ramp=R, adapt_span_cache=True,
               adapt_io=True, adapt_io_cutoffs=[40, 120], adapt_io_divval=2)
    model = TransformerSeq(ModelConfig(**{**cfg, **overrides})).to(dtype)
    with torch.no_grad():
        for layer in model.layers:
            layer.span.current_val.copy_(torch.tensor(SPANS).view(-1, 1, 1))
    return model.eval()


def kept_mass(model, ids) -> float:
    """Smallest softmax mass a head keeps inside its span: by hooking the first layer's
    weights on a block of ``ids``, through the one weights function."""
    import attention
    seen = []
    original = attention.attention_weights

    def spy(logits, head_dim, span_mask=None, *args, **kwargs):
        probs, pers = original(logits, head_dim, None, *args, **kwargs)
        if span_mask is not None:
            seen.append((probs * span_mask).sum(-1).min().item())
        return original(logits, head_dim, span_mask, *args, **kwargs)

    attention.attention_weights = spy
    try:
        with torch.no_grad():
            model(ids, model.init_cache(ids.size(0)))
    finally:
        attention.attention_weights = original
    return min(seen)


@torch.no_grad()
def score(model, ids, block: int) -> torch.Tensor:
    """Log-probabilities (B, T, V) of ``ids`` (B, T) in blocks of ``block`` from zero caches."""
    caches, out = model.init_cache(ids.size(0)), []
    for start in range(0, ids.size(1), block):
        log_probs, caches = model(ids[:, start:start + block], caches)  # (B, m, V)
        out.append(log_probs)
    return torch.cat(out, 1)  # (B, T, V)


def generated(model, ids, prompt: int, block: int) -> torch.Tensor:
    cache = KVCache(model)
    first = cache.prefill(ids[:, :prompt], block)  # (B, P, V)
    steps = [cache.step(ids[:, t]).unsqueeze(1) for t in range(prompt, ids.size(1))]
    return torch.cat([first] + steps, 1)  # (B, T, V)


def close(dtype):
    return dict(atol=1e-5, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-10, rtol=0)


def test_the_case_is_the_hard_one():
    """The first head keeps ~1e-8 of its mass (the 1e-8 term dominates) and the planner
    merges windows differently for block 1, block 64 and batch 3."""
    model = low_mass_model(torch.float64)
    ids = torch.randint(300, (1, 64), generator=torch.Generator().manual_seed(1))
    assert kept_mass(model, ids) < 1e-7
    span, D = model.layers[0].span, model.cfg.head_dim
    plans = [attention_plan(span, 4, L, B, M, D)[1] for B, M in ((1, 1), (1, 64), (3, 64), (3, 17))]
    assert len({repr(p) for p in plans}) >= 2
    assert any(g[0] > 64 and (range(4)[g[2]] if isinstance(g[2], slice) else g[2])[0] == 0
               for groups in plans for g in groups)  # the low-mass head scored in a wider group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generation_equals_recomputation(dtype):
    model = low_mass_model(dtype)
    ids = torch.randint(300, (2, 260), generator=torch.Generator().manual_seed(2))
    want = torch.cat([score(model, ids[:, :150], 64), _one_by_one(model, ids, 150)], 1)  # (B, T, V)
    torch.testing.assert_close(generated(model, ids, 150, 64), want, **close(dtype))


@torch.no_grad()
def _one_by_one(model, ids, prompt: int) -> torch.Tensor:
    """The prompt in blocks of 64, then one position per forward (the recomputation)."""
    caches = model.init_cache(ids.size(0))
    for start in range(0, prompt, 64):
        _, caches = model(ids[:, start:min(start + 64, prompt)], caches)
    out = []
    for t in range(prompt, ids.size(1)):
        log_probs, caches = model(ids[:, t:t + 1], caches)  # (B, 1, V)
        out.append(log_probs)
    return torch.cat(out, 1)  # (B, T-P, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_equals_token_by_token(dtype):
    model = low_mass_model(dtype)
    ids = torch.randint(300, (3, 140), generator=torch.Generator().manual_seed(4))
    whole = score(model, ids, 64)  # (B, T, V)
    for block in (1, 17, 140):
        torch.testing.assert_close(score(model, ids, block), whole, **close(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_size_does_not_change_scores(dtype):
    model = low_mass_model(dtype)
    ids = torch.randint(300, (3, 100), generator=torch.Generator().manual_seed(5))
    batch = score(model, ids, 64)  # (3, T, V)
    for row in range(3):
        torch.testing.assert_close(score(model, ids[row:row + 1], 64)[0], batch[row], **close(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_in_module_does_not_depend_on_batch_or_length(dtype):
    """AdaptiveSpanAttention: a row alone equals the row in a batch, and a prefix of the
    sequence equals the same positions of the whole (the planner merges differently)."""
    torch.manual_seed(6)
    attn = AdaptiveSpanAttention(hidden_size=32, nheads=4, max_span=L, ramp=R).to(dtype).eval()
    with torch.no_grad():
        attn.span.current_val.copy_(torch.tensor(SPANS, dtype=dtype).view(-1, 1, 1))
        x = torch.randn(3, 290, 32, generator=torch.Generator().manual_seed(7), dtype=dtype)  # (B, T, H)
        whole = attn(x)  # (B, T, H)
        for row in range(3):
            torch.testing.assert_close(attn(x[row:row + 1])[0], whole[row], **close(dtype))
        for T in (1, 40, 130):
            torch.testing.assert_close(attn(x[:, :T]), whole[:, :T], **close(dtype))
