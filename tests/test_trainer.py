
import numpy as np
import pytest
import torch

from models import ModelConfig, TransformerSeq
from config import TrainConfig
from evaluation import evaluate
from optim import AdagradWithGradClip, lr_at
from trainer import Trainer
from utils import DistInfo


def test_adagrad_clips_the_step_per_tensor_and_accumulates_unclipped_squares():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3, 2))
    opt = AdagradWithGradClip([a, b], lr=0.5, grad_clip=0.1)
    a0, b0 = a.detach().clone(), b.detach().clone()
    sums = [torch.zeros(5), torch.zeros(3, 2)]
    for step in range(3):
        grads = [torch.randn(5) * (step + 1), torch.randn(3, 2) * 0.01]
        a.grad, b.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        for i, (p0, g) in enumerate(zip((a0, b0), grads)):
            norm = g.norm().item()
            clr = 0.5 * (0.1 / (norm + 1e-10) if norm > 0.1 else 1.0)
            sums[i] += g * g
            p0 -= clr * g / (sums[i].sqrt() + 1e-10)
    torch.testing.assert_close(a.detach(), a0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), b0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[a]["sum"], sums[0])  # unclipped g^2


def test_warmup_counts_updates_from_one_then_stays_constant():
    cfg = TrainConfig(lr=0.07, lr_warmup=4)
    assert [lr_at(t, cfg) for t in (1, 2, 4, 9)] == pytest.approx([0.07 / 4, 0.07 / 2, 0.07, 0.07])
    assert lr_at(1, TrainConfig(lr=0.07, lr_warmup=0)) == 0.07


def small_model(**kw):
    cfg = ModelConfig(vocab_size=11, hidden_size=16, inner_hidden_size=32, nlayers=2, nheads=2,
                      attn_span=24, dropout=0.0, adapt_span=True, adapt_span_loss=0.01,
                      adapt_span_cache=False, **kw)
    torch.manual_seed(0)
    model = TransformerSeq(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.span.current_val.uniform_(0, 1)
    return model


def make_trainer(model, split: int):
    cfg = TrainConfig(optim="sgd", lr=0.1, momentum=0.0, batch_size=4, batch_split=split, block_size=8)
    ids = np.random.RandomState(0).randint(0, 11, 400)
    return Trainer(model, model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, DistInfo(), ids, ids)


def test_batch_split_gives_the_same_update_and_caches():
    full, split = small_model(), small_model()
    split.load_state_dict(full.state_dict())
    t_full, t_split = make_trainer(full, 1), make_trainer(split, 2)
    for _ in range(3):
        r_full, r_split = t_full.train_step(), t_split.train_step()
        assert r_full["loss"] == pytest.approx(r_split["loss"], rel=1e-6)
    for p, q in zip(full.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for c, d in zip(t_full.train_cache, t_split.train_cache):
        torch.testing.assert_close(c, d)


def test_span_is_clamped_after_each_step():
    model = small_model()
    trainer = make_trainer(model, 1)
    with torch.no_grad():
        model.layers[0].span.current_val.fill_(1.5)
    trainer.train_step()
    assert float(model.layers[0].span.current_val.detach().max()) <= 1.0


def stream_nll(model, ids):
    """Token-by-token scoring of one stream from an empty cache: a plain reference."""
    cache = model.init_cache(1)
    total = 0.0
    for t in range(len(ids) - 1):
        nll, cache = model(torch.tensor([[ids[t]]]), cache, torch.tensor([[ids[t + 1]]]))
        total += nll.item()
    return total


@torch.no_grad()
def test_full_evaluation_scores_every_token():
    model = small_model().eval()
    ids = np.random.RandomState(1).randint(0, 11, 53)
    nll, count = evaluate(model, model, ids, batch_size=2, block=8, dist=DistInfo())
    assert count == 52
    # rows: targets 1..26 and 27..52, each row from an empty cache
    expected = stream_nll(model, ids[0:27]) + stream_nll(model, ids[26:53])
    assert nll * count == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_reference_evaluation_is_the_mean_of_full_block_means():
    model = small_model().eval()
    ids = np.random.RandomState(2).randint(0, 11, 2 * 30 + 1)
    nll, count = evaluate(model, model, ids, batch_size=2, block=8, dist=DistInfo(), reference=True)
    rows = torch.tensor(ids[:60]).view(2, 30)
    cache, means, pos = model.init_cache(2), [], 0
    while True:  # the reference loop: stop once pos >= ncols - block after a block
        out, cache = model(rows[:, pos:pos + 8], cache, rows[:, pos + 1:pos + 9])
        means.append(out.mean().item())
        pos += 8
        if pos >= 30 - 8:
            break
    assert count == 2 * 8 * len(means) == 48
    assert nll == pytest.approx(float(np.mean(means)), rel=1e-6)
