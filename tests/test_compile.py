"""``--compile`` (compile_model.py): compiled layers give the eager losses over 100 training
steps while the learned spans cross window buckets, with a bounded number of graphs.

The aot_eager backend (dynamo capture, guards and AOT autograd's traced forward and
backward, no code generation) keeps this test at a few seconds; the inductor case
compiles C++ on the CPU (two graphs, about 45 s of CPU time: the slowest test of the
suite, kept because it is the backend ``--compile`` uses).

Dimension legend: B batch, M block length, L max span.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compile_model import compile_layers  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from optim import AdagradWithGradClip  # noqa: E402

B, M, STEPS = 2, 16, 100


@pytest.fixture(autouse=True)
def one_thread():
    """Compilation and tiny steps on one thread (two threads on a busy 2-core machine
    slow this test tenfold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(backend):
    """Losses of 100 steps, the (L', windows) plans met, and the compiled-graph count."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, hidden_size=16, inner_hidden_size=32, nlayers=2, nheads=4,
                      attn_span=128, dropout=0.0, adapt_span=True, adapt_span_cache=True,
                      adapt_span_init=0.3, adapt_span_loss=0.02)
    model = TransformerSeq(cfg)
    counter = compile_layers(model, backend) if backend else None
    opt = AdagradWithGradClip(model.parameters(), lr=0.1, grad_clip=0.5)
    x = torch.randint(0, 11, (B, M * STEPS + 1), generator=torch.Generator().manual_seed(1))
    caches, losses, plans = model.init_cache(B), [], set()
    for s in range(STEPS):
        cols = slice(s * M, (s + 1) * M)
        plans.update((layer.span.kept_len(), tuple(layer.span.head_windows())) for layer in model.layers)
        nll, caches = model(x[:, cols], caches, x[:, s * M + 1:(s + 1) * M + 1])  # (B, M)
        loss = nll.mean() + model.span_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_spans()
        losses.append(nll.detach().mean())
    return torch.stack(losses), plans, counter.graphs if counter else None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the slow case (C++)
def test_compiled_layers_give_the_eager_losses_with_few_graphs(backend):
    eager, plans, _ = train(None)
    assert len(plans) >= 2  # the spans moved across window buckets during the run
    compiled, compiled_plans, graphs = train(backend)
    assert compiled_plans == plans
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    # one graph per distinct plan (the layers share them), never one per step
    assert 1 <= graphs <= len(plans) + 1
