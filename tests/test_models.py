"""TransformerSeq: published model sizes."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ModelConfig, TransformerSeq  # noqa: E402

CHAR = dict(vocab_size=205, hidden_size=512, nheads=8, attn_span=8192, adapt_span=True,
            adapt_span_cache=True)


@pytest.mark.parametrize("name, overrides, millions", [
    ("enwik8", dict(nlayers=12, inner_hidden_size=2048), 38.54),
    ("enwik8_pers_small", dict(nlayers=18, inner_hidden_size=1, pers_mem_size=1024), 38.50),
    ("enwik8_pers", dict(nlayers=36, inner_hidden_size=1, pers_mem_size=2048), 114.02),
    ("wiki103_pers", dict(vocab_size=267735, nlayers=36, inner_hidden_size=1, pers_mem_size=2048,
                          attn_span=2048, adapt_io=True, adapt_io_tied=True), 132.49),
])
def test_published_parameter_counts(name, overrides, millions):
    """The counts the reference prints (shared tensors once) for the published scripts."""
    with torch.device("meta"):  # shapes only
        model = TransformerSeq(ModelConfig(**{**CHAR, **overrides}))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions, name


def tiny(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=10, hidden_size=16, nheads=2, nlayers=2, attn_span=256, inner_hidden_size=8,
                dropout=0.0, adapt_span=True, adapt_span_ramp=32)
    return TransformerSeq(ModelConfig(**{**base, **kw}))


def test_persistent_memory_removes_the_feed_forward_unless_kept():
    plain = tiny(pers_mem_size=4)
    assert all(layer.ff is None and layer.norm2 is None for layer in plain.layers)
    kept = tiny(pers_mem_size=4, pers_mem_keep_ff=True)
    assert all(layer.ff is not None and layer.norm2 is not None for layer in kept.layers)


def test_span_statistics_and_cache_sizes_follow_the_reference_formulas():
    model = tiny(adapt_span_cache=True)
    values = [[0.1, 0.7], [0.0, 0.05]]
    with torch.no_grad():
        for layer, v in zip(model.layers, values):
            layer.span.current_val.copy_(torch.tensor(v).view(2, 1, 1))
    L, R = 256, 32
    spans = [[min(L, math.ceil(z * L) + R) for z in v] for v in values]  # ceil(z * L) + R, clamped
    assert model.head_spans() == spans == [[58, 212], [32, 45]]
    avg = [min(L, math.ceil(sum(v) / 2 * L) + R) for v in values]
    assert model.span_stats() == {"span_avg": sum(avg) / 2, "span_max": 212.0}
    # trim_len = min(L - 1, L - max_span) rounded down to 64; cache = min(L, L - trim + 64)
    trims = [(min(L - 1, L - max(s))) // 64 * 64 for s in spans]
    assert trims == [0, 192]
    assert model.cache_sizes() == [min(L, L - t + 64) for t in trims] == [256, 128]
    assert [c.shape for c in model.init_cache(3)] == [(3, 256, 16), (3, 128, 16)]
    assert model.span_loss().item() == 0.0  # lambda defaults to 0
    model = tiny(adapt_span_loss=0.5)
    with torch.no_grad():
        for layer, v in zip(model.layers, values):
            layer.span.current_val.copy_(torch.tensor(v).view(2, 1, 1))
    expected = sum(0.5 * L * sum(v) / 2 for v in values)  # lambda * L * mean over heads, summed
    assert model.span_loss().item() == pytest.approx(expected)
