"""Host syncs: a forward pass reads the span integers cached by ``refresh_spans`` and
makes no ``.item()`` / ``.tolist()`` call; a training step makes a fixed number of them,
whatever the number of layers and parameters. Also: the span integers are right after
loading, clamping and in-place changes, and ``head_spans`` counts the mask exactly.

Dimension legend: B batch, M block length, L max span, K heads.
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_span import AdaptiveSpan, head_window, reference_span, trim_length  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from config import TrainConfig  # noqa: E402
from optim import build_optimizer  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils import DistInfo  # noqa: E402


class SyncCounter:
    """Counts torch.Tensor.item / tolist calls while active."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return counted


def tiny(nlayers, impl="grouped", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, hidden_size=16, inner_hidden_size=32, nlayers=nlayers, nheads=4,
                      attn_span=128, dropout=0.0, adapt_span=True, adapt_span_cache=True,
                      adapt_span_init=0.1, attn_impl=impl, **kw)
    return TransformerSeq(cfg)


@pytest.mark.parametrize("impl", ["grouped", "reference"])
def test_forward_makes_no_host_sync(monkeypatch, impl):
    model = tiny(3, impl, pers_mem_size=2, pers_mem_keep_ff=True)
    x = torch.randint(0, 11, (2, 17))
    caches = model.init_cache(2)
    counter = SyncCounter(monkeypatch)
    for _ in range(2):
        nll, caches = model(x[:, :-1], caches, x[:, 1:])  # (B, M)
        nll.mean().backward()
    assert counter.count == 0


def _trainer(nlayers, optim):
    model = tiny(nlayers)
    cfg = TrainConfig(optim=optim, lr=0.05, grad_clip=0.5, batch_size=2, block_size=8, nbatches=5)
    ids = np.random.default_rng(0).integers(0, 11, 400)
    return Trainer(model, model, build_optimizer(model.parameters(), cfg), cfg, DistInfo(), ids, ids)


@pytest.mark.parametrize("optim", ["adagrad", "sgd"])
def test_training_step_syncs_do_not_grow_with_layers(monkeypatch, optim):
    counts = []
    for nlayers in (1, 4):
        trainer = _trainer(nlayers, optim)
        trainer.train_step()  # optimizer state created
        counter = SyncCounter(monkeypatch)
        trainer.train_step()
        counts.append(counter.count)
        monkeypatch.undo()
    assert counts[0] == counts[1] <= 3  # grad norm, span refresh, loss


def test_cached_spans_follow_every_change():
    model = tiny(2)
    span = model.layers[0].span
    assert span.head_spans() == [45] * 4  # ceil(0.1 * 128) + 32
    with torch.no_grad():
        span.current_val.fill_(0.5)  # an in-place change is seen at the next use
    assert span.head_spans() == [96] * 4 and span.trim_len() == 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny(2)
    other.load_state_dict(state)
    assert other.layers[0].span.state() == span.state()
    with torch.no_grad():
        other.layers[1].span.current_val.fill_(1.5)
    other.clamp_spans()
    assert other.layers[1].span.head_spans() == [128] * 4


def test_head_spans_count_the_mask_exactly():
    """Property: head_spans() is the number of non-zero mask positions, reach() the number
    of positions where the unclamped mask is >= 0, over random settings, many with z * L an
    integer (where ceil(z) + R used to be one too many)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        L = int(torch.randint(16, 700, (1,), generator=g))
        R = int(torch.randint(1, 40, (1,), generator=g))
        K = 3
        span = AdaptiveSpan(L, K, ramp=R)
        if trial % 2:  # z * L an integer, from just below the ramp to just past L
            vals = torch.randint(-R - 2, L + 2, (K,), generator=g).double() / L
        else:
            vals = torch.rand(K, generator=g, dtype=torch.float64) * 1.2 - 0.1
        with torch.no_grad():
            span.current_val.copy_(vals.view(K, 1, 1))
        mask = span.mask(L)  # (K, 1, L)
        assert span.head_spans() == (mask > 0).sum(-1).view(-1).tolist()
        raw = (span._mask.mask_template + span.current_val * L) / R + 1  # (K, 1, L)
        assert span.reach() == (raw >= 0).sum(-1).view(-1).tolist()
        for k, (w, r) in enumerate(zip(span.head_windows(), span.reach())):
            assert w == head_window(r, span.kept_len())
            assert mask[k, 0, :L - w].abs().sum() == 0 or w == span.kept_len()
        top = span.current_val.max().item()
        assert span.max_span() == reference_span(top, L, R) == min(max(math.ceil(top * L) + R, 0), L)
        assert span.trim_len() == trim_length(span.max_span(), L)
