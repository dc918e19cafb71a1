"""The cached span integers are never stale: after every way of writing a span parameter
(fused and foreach optimizers, ``.data`` writes, ``vector_to_parameters``,
``load_state_dict``, a dtype move), the next forward of ``TransformerSeq`` and of
``AdaptiveSpanAttention`` equals a fresh model's (built from the same state) to 1e-6.

Dimension legend: B batch, M block length, T sequence length, H hidden, K heads.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ModelConfig, TransformerSeq  # noqa: E402
from span_attention import AdaptiveSpanAttention  # noqa: E402

NEW = torch.tensor([0.02, 0.9, 0.3, 0.6]).view(4, 1, 1)  # (K, 1, 1): other windows than 0.1


def _adam(fused: bool):
    def write(module, params):
        """One Adam step with gradients on the span parameters only, towards NEW."""
        for p in module.parameters():
            p.grad = None
        for p in params:
            p.grad = (p.detach() - NEW.to(p.dtype)).sign()  # Adam's first step moves each by lr
        opt = torch.optim.Adam(params, lr=0.5, fused=fused, foreach=None if fused else True)
        opt.step()
    return write


def _data_copy(module, params):
    for p in params:
        p.data.copy_(NEW)


def _data_assign(module, params):
    for p in params:
        p.data = NEW.clone()


def _vector_to_parameters(module, params):
    torch.nn.utils.vector_to_parameters(torch.cat([NEW.view(-1)] * len(params)), params)


def _load_state_dict(module, params):
    state = {k: (NEW.clone() if k.endswith("current_val") else v) for k, v in module.state_dict().items()}
    module.load_state_dict(state)


def _double(module, params):
    with torch.no_grad():
        for p in params:
            p.copy_(NEW)  # an in-place write (version counter), then the move
    module.double()


WRITES = {"fused-adam": _adam(True), "foreach-adam": _adam(False), "data-copy": _data_copy,
          "data-assign": _data_assign, "vector-to-parameters": _vector_to_parameters,
          "load-state-dict": _load_state_dict, "dtype-move": _double}


def _span_params(module):
    return [p for name, p in module.named_parameters() if name.endswith("current_val")]


def _fresh(module, build):
    """A new module holding ``module``'s state: its integers computed from scratch."""
    other = build()
    if next(module.parameters()).dtype == torch.float64:
        other = other.double()
    other.load_state_dict(module.state_dict())
    return other


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=13, hidden_size=16, inner_hidden_size=24, nlayers=2, nheads=4,
                      attn_span=256, dropout=0.0, adapt_span=True, adapt_span_cache=True,
                      adapt_span_init=0.1, adapt_span_ramp=16)
    return TransformerSeq(cfg), cfg


@pytest.mark.parametrize("way", sorted(WRITES))
def test_transformer_seq_after_write(way):
    model, cfg = _model()
    x = torch.randint(0, 13, (2, 33), generator=torch.Generator().manual_seed(1))  # (B, M+1)
    caches = model.init_cache(2)
    _, caches = model(x[:, :-1], caches, x[:, 1:])  # integers cached, caches carried
    before = [layer.span.state() for layer in model.layers]
    WRITES[way](model, _span_params(model))
    with torch.no_grad():  # the next forward, with the caches of before the write
        nll, _ = model(x[:, :-1], [c.to(model.key_pe.dtype) for c in caches], x[:, 1:])  # (B, M)
    after = [layer.span.state() for layer in model.layers]
    assert after != before and after[0].windows != before[0].windows  # the write changed the windows
    fresh = _fresh(model, lambda: TransformerSeq(cfg))
    assert [layer.span.state() for layer in fresh.layers] == after
    with torch.no_grad():
        want, _ = fresh(x[:, :-1], [c.to(model.key_pe.dtype) for c in caches], x[:, 1:])  # (B, M)
    torch.testing.assert_close(nll, want, atol=1e-6, rtol=0)


def _drop_in():
    torch.manual_seed(0)
    return AdaptiveSpanAttention(hidden_size=16, nheads=4, max_span=256, ramp=16, init_val=0.1)


@pytest.mark.parametrize("way", sorted(WRITES))
def test_adaptive_span_attention_after_write(way):
    attn = _drop_in()
    x = torch.randn(2, 200, 16, generator=torch.Generator().manual_seed(2))  # (B, T, H)
    attn(x)  # integers cached
    before = attn.span.state()
    WRITES[way](attn, _span_params(attn))
    with torch.no_grad():
        y = attn(x.to(attn.key_pe.dtype))  # (B, T, H)
    assert attn.span.state().windows != before.windows
    fresh = _fresh(attn, _drop_in)
    with torch.no_grad():
        torch.testing.assert_close(y, fresh(x.to(attn.key_pe.dtype)), atol=1e-6, rtol=0)


def test_one_sync_per_write_and_none_otherwise(monkeypatch):
    """After an optimizer step (without clamp_spans) the next forward refreshes every layer
    with one host sync; the forward after it makes none."""
    model, _ = _model()
    x = torch.randint(0, 13, (2, 17))
    counted = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: counted.append(1) or original(t))
    caches = model.init_cache(2)
    nll, caches = model(x[:, :-1], caches, x[:, 1:])  # (B, M)
    (nll.mean() + model.span_loss()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert len(counted) == 0
    model(x[:, :-1], caches, x[:, 1:])
    assert len(counted) == 1
    model(x[:, :-1], caches, x[:, 1:])
    assert len(counted) == 1


def test_deepcopy_keeps_tracking_data_writes():
    model, _ = _model()
    other = copy.deepcopy(model)
    other.layers[0].span.state()
    other.layers[0].span.current_val.data.copy_(NEW)
    assert other.layers[0].span.stale()
