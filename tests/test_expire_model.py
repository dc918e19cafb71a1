"""Expire span in the model: with every span forced to L it is the model without expiry; the
memory grows and shrinks with the spans; the flags' combinations."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from expire_span import pack, unpack  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402

BASE = dict(vocab_size=11, hidden_size=16, nheads=2, nlayers=2, attn_span=8, inner_hidden_size=8,
            dropout=0.0, attn_impl="reference")


def pair(**expire):
    torch.manual_seed(0)
    plain = TransformerSeq(ModelConfig(**BASE)).double().eval()
    model = TransformerSeq(ModelConfig(**BASE, expire_span=True, **expire)).double().eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("span_predictor" in k for k in missing)
    return plain, model


def test_spans_forced_to_the_limit_give_the_model_without_expiry():
    """L = --attn-span = --attn-lim, ramp 1, spans L: a query sees exactly the L previous
    positions, as the reference attention does, block after block (memory dropped to L)."""
    plain, model = pair(attn_lim=8, expire_span_ramp=1)
    with torch.no_grad():
        for layer in model.layers:
            layer.expire.span_predictor.weight.normal_()  # w.h is drowned by b: sigmoid = 1 exactly
            layer.expire.span_predictor.bias.fill_(60.0)
    B, M, L, H = 3, 4, 8, 16
    hidden = [torch.randn(B, L, H, dtype=torch.float64) for _ in range(2)]
    caches = hidden
    memories = [pack(h, torch.zeros(B, L), torch.arange(L, 0, -1).double().expand(B, L)) for h in hidden]
    for _ in range(4):
        x = torch.randint(0, 11, (B, M))
        y = torch.randint(0, 11, (B, M))
        want, caches = plain(x, caches, y)
        got, memories = model(x, memories, y)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        for cache, memory in zip(caches, memories):
            h, spans, ages = unpack(memory)
            assert ages.tolist() == [list(range(L, 0, -1))] * B and (spans == L).all()
            torch.testing.assert_close(h, cache, rtol=0, atol=1e-6)  # the 1e-8 of the renormalisation


def test_memory_varies_with_the_spans():
    _, model = pair(attn_lim=64, expire_span_ramp=4, expire_span_init_percentage=0.2, expire_span_loss=1e-3)
    with torch.no_grad():
        for layer in model.layers:
            layer.expire.span_predictor.weight.normal_(0, 3.0)
    model.train()
    B, M = 2, 4
    memories, lengths = model.init_cache(B), []
    for _ in range(12):
        x = torch.randint(0, 11, (B, M))
        nll, memories = model(x, memories, x)
        loss = nll.mean() + model.span_loss()
        loss.backward()
        lengths.append([m.size(1) for m in memories])
        for m in memories:
            _, spans, ages = unpack(m)
            expired = (ages[:, :-M] >= spans[:, :-M] + 4).sum(1)  # (B,) kept, but seen by no later query
            assert expired.min() < M  # the batch's smallest count was dropped, rounded down to M
    assert all(layer.expire.span_predictor.weight.grad.abs().sum() > 0 for layer in model.layers)
    flat = [n for row in lengths for n in row]
    assert max(flat) > M and len(set(flat)) > 2 and all(n % M == 0 for n in flat)
    assert model.span_loss().item() == 0.0  # taken once


@pytest.mark.parametrize("extra, message", [
    (["--adapt-span"], "error: --expire-span and --adapt-span"),
    (["--compile"], "error: --compile does not support --expire-span"),
    (["--expire-span-init-percentage", "1"], "error: --expire-span-init-percentage is a fraction"),
    (["--expire-span-ramp", "0"], "error: --expire-span-ramp must be at least 1"),
])
def test_bad_combinations_are_one_error_line(extra, message):
    argv = [sys.executable, str(ROOT / "main.py"), "--dry-run", "--vocab-size", "11", "--expire-span",
            "--batch-sz", "4"] + extra
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), lines


def test_flops_count_the_memory_kept():
    import flops
    _, model = pair(attn_lim=64, expire_span_ramp=4)
    D, K, P, M = 8, 2, 8, 4
    got = flops.flops_per_token(model, [16, 0], M)
    keys = [16 + 1.5, 1.5]  # kept memories and the block's earlier positions on average
    want = sum(K * 2 * D * (2 * k + min(P, k)) for k in keys)
    assert got.attn == want
    assert got.attn_max == 2 * K * 2 * D * (2 * (68 + 1.5) + P)
    assert got.model - got.attn == flops.flops_per_token(pair()[0]).model - flops.flops_per_token(pair()[0]).attn


@pytest.mark.parametrize("batch", [1, 3])
def test_generation_keeps_unexpired_memories_and_equals_the_model(batch):
    """KVCache (prompt in blocks, then one position per step) against the model's own forward
    (the prompt in blocks, then one position per forward), in float64."""
    from inference import KVCache
    torch.manual_seed(5)
    cfg = dict(BASE, attn_span=16, expire_span=True, attn_lim=60, expire_span_ramp=8,
               expire_span_init_percentage=0.3, pers_mem_size=3, pers_mem_keep_ff=True)
    model = TransformerSeq(ModelConfig(**cfg)).double().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.expire.span_predictor.weight.normal_(0, 1.0)
    ids = torch.randint(11, (batch, 180), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        caches, want = model.init_cache(batch), []
        bounds = list(range(0, 100, 32)) + list(range(100, 180))
        for start, stop in zip(bounds, bounds[1:] + [180]):
            log_probs, caches = model(ids[:, start:stop], caches)
            want.append(log_probs)
    cache = KVCache(model)
    got = [cache.prefill(ids[:, :100], 32)] + [cache.step(ids[:, t]).unsqueeze(1) for t in range(100, 180)]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-10, rtol=0)
    for plan in cache.plans:
        assert plan.keys.size(2) < 180  # expired memories left the cache
        dist = cache.position - plan.positions  # (B, C)
        expired = (plan.spans + 8 <= dist).sum(1)
        assert expired.min() == 0  # the batch's smallest count of expired memories was dropped


def test_resharded_memories_are_padded_with_memories_no_query_weighs():
    """A resume on another number of ranks stacks the ranks' memories of unequal lengths:
    the padded rows give the same next block as each rank's own memory."""
    from train_state import _reshard
    from utils import DistInfo
    _, model = pair(attn_lim=40, expire_span_ramp=4, expire_span_init_percentage=0.5)
    with torch.no_grad():
        for layer in model.layers:
            layer.expire.span_predictor.weight.normal_(0, 1.0)
    ranks = []
    with torch.no_grad():
        for blocks, seed in ((6, 1), (2, 2)):  # two ranks: long and short memories
            g = torch.Generator().manual_seed(seed)
            memories = model.init_cache(2)
            for _ in range(blocks):
                _, memories = model(torch.randint(0, 11, (2, 4), generator=g), memories)
            ranks.append(memories)
        x = torch.randint(0, 11, (4, 4))
        want = torch.cat([model(x[2 * r:2 * r + 2], ranks[r])[0] for r in range(2)])
        joined = _reshard(ranks, DistInfo(device=torch.device("cpu")), model.cfg)
        assert ranks[0][0].size(1) > ranks[1][0].size(1)
        assert [m.size(1) for m in joined] == [max(r[l].size(1) for r in ranks) for l in range(2)]
        torch.testing.assert_close(model(x, joined)[0], want, rtol=0, atol=1e-12)


def test_generate_same_tokens_with_and_without_kv_cache():
    sys.path.insert(0, str(ROOT / "scripts"))
    import generate
    torch.manual_seed(7)
    model = TransformerSeq(ModelConfig(**dict(BASE, expire_span=True, attn_lim=48, expire_span_ramp=8,
                                              expire_span_init_percentage=0.3))).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.expire.span_predictor.weight.normal_(0, 1.0)
    prompt = [1, 2, 3, 4, 5] * 6
    for temperature in (0.0, 1.0):
        with_kv = list(generate.generate(model, prompt, 120, 8, temperature, 0, 7))
        assert with_kv == list(generate.generate(model, prompt, 120, 8, temperature, 0, 7, kv_cache=False))
    batch = list(generate.generate_batch(model, prompt, 60, 8, 1.0, 5, 8, num_samples=3))
    assert batch == list(generate.generate_batch(model, prompt, 60, 8, 1.0, 5, 8, 3, False))


def test_rows_run_apart_and_joined_give_the_model_of_the_whole_batch():
    """--batch-split: each pass keeps its own memory length; joined (padded) they give the
    same next blocks as the whole batch run at once."""
    _, model = pair(attn_lim=40, expire_span_ramp=4, expire_span_init_percentage=0.4)
    with torch.no_grad():
        for layer in model.layers:
            layer.expire.span_predictor.weight.normal_(0, 2.0)
    whole, split = model.init_cache(4), model.init_cache(4)
    differ = 0
    with torch.no_grad():
        for _ in range(10):
            x = torch.randint(0, 11, (4, 4))
            want, whole = model(x, whole)
            halves = [model(x[r:r + 2], [m[r:r + 2] for m in split]) for r in (0, 2)]
            differ += any(a.size(1) != b.size(1) for a, b in zip(halves[0][1], halves[1][1]))
            split = [model.join_rows([halves[0][1][l], halves[1][1][l]]) for l in range(2)]
            torch.testing.assert_close(torch.cat([halves[0][0], halves[1][0]]), want, rtol=0, atol=1e-12)
    assert differ  # the passes kept memories of different lengths
