"""inference.KVCache against the full recomputation (model(x, caches) one position at a
time, hidden-state caches from zeros): the log-probabilities of every position of a
prompt run in blocks and of the positions appended one by one after it."""
import contextlib
import copy
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import attention  # noqa: E402
import checkpoint as ckpt_io  # noqa: E402
import generate  # noqa: E402
import main as entry  # noqa: E402
from data import Vocab  # noqa: E402
from inference import KVCache  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from trainer import TrainConfig  # noqa: E402
from build import build_model  # noqa: E402
from settings import Settings  # noqa: E402
from train_state import load_model_state  # noqa: E402

FIXTURES = ROOT / ".." / "shared" / "data" / "fixtures"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def recompute(model: TransformerSeq, ids: torch.Tensor, prompt: int, block: int) -> torch.Tensor:
    """The plain path: ids (B, T), the first ``prompt`` in blocks, then one position per
    forward, hidden-state caches carried from zeros -> log-probabilities (B, T, V)."""
    caches, out = model.init_cache(ids.size(0)), []
    bounds = list(range(0, prompt, block)) + list(range(prompt, ids.size(1)))
    for start, stop in zip(bounds, bounds[1:] + [ids.size(1)]):
        log_probs, caches = model(ids[:, start:stop], caches)  # (B, m, V)
        out.append(log_probs)
    return torch.cat(out, 1)  # (B, T, V)


def cached(model: TransformerSeq, ids: torch.Tensor, prompt: int, block: int,
           shared_prompt: bool = False) -> torch.Tensor:
    """The same log-probabilities (B, T, V) through a KVCache; with ``shared_prompt`` the
    first row's prompt starts every stream (prefill with batch_size B)."""
    cache = KVCache(model)
    head = ids[:1, :prompt] if shared_prompt else ids[:, :prompt]  # (B0, P)
    first = cache.prefill(head, block, ids.size(0)).expand(ids.size(0), -1, -1)  # (B, P, V)
    steps = [cache.step(ids[:, t]).unsqueeze(1) for t in range(prompt, ids.size(1))]  # (B, 1, V) each
    return torch.cat([first] + steps, 1)  # (B, T, V)


def check(model: TransformerSeq, ids: torch.Tensor, prompt: int, block: int, shared: bool = False,
          rtol: float = 1e-6):
    """KV path == full recomputation: in float32 to 1e-5 (plus ``rtol`` of the value, for
    the log-probabilities near -30 of unlikely tokens in an untrained model) and in
    float64 to 1e-10 (the float32 paths round differently, each about 5e-6 from float64)."""
    model.eval()
    torch.testing.assert_close(cached(model, ids, prompt, block, shared),
                               recompute(model, ids, prompt, block), atol=1e-5, rtol=rtol)
    wide = copy.deepcopy(model).double()
    with exact_windows():
        torch.testing.assert_close(cached(wide, ids, prompt, block, shared),
                                   recompute(wide, ids, prompt, block), atol=1e-10, rtol=0)


@contextlib.contextmanager
def exact_windows():
    """The model's planner without its per-group and per-chunk overheads: it then never
    merges windows, so each head's softmax runs over its own window, as in the KV cache
    (merged windows change the result by the 1e-8 of the renormalisation only)."""
    saved = attention.GROUP_COST, attention.CHUNK_COST
    attention.GROUP_COST = attention.CHUNK_COST = 0.0
    attention.plan_groups.cache_clear()
    try:
        yield
    finally:
        attention.GROUP_COST, attention.CHUNK_COST = saved
        attention.plan_groups.cache_clear()


# ---- reference checkpoints ------------------------------------------------------------
@pytest.mark.parametrize("name", ["F1-text8-span", "F2-enwik8-pers-span", "F4-text8-varied-spans"])
def test_fixture_checkpoints(name):
    """300 prompt tokens in blocks of 64, then 150 positions one at a time."""
    folder = FIXTURES / name
    if not (folder / "checkpoint.pt").exists():
        pytest.skip(f"shared fixtures absent: {folder}")
    expected = json.loads((folder / "expected.json").read_text())
    args = entry.build_parser().parse_args(expected["flags"].split())
    model, _ = build_model(Settings.from_args(args), len(expected["vocab_idx2word"]), "cpu")
    load_model_state(model, ckpt_io.load_checkpoint(folder / "checkpoint.pt"), folder)
    ids = torch.tensor([expected["stream"]["token_ids"][:450]])  # (1, 450)
    check(model, ids, 300, args.block_sz, rtol=0)


# ---- small random models ----------------------------------------------------------------
def random_model(seed: int, spans=None, **overrides) -> TransformerSeq:
    """A randomly initialised model; ``spans`` sets current_val (per head, every layer)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=23, hidden_size=32, inner_hidden_size=48, nlayers=2, nheads=4,
               attn_span=100, dropout=0.0)
    model = TransformerSeq(ModelConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for layer in model.layers:
            if spans is not None:
                layer.span.current_val.copy_(torch.tensor(spans).view(-1, 1, 1))
    return model.eval()


VARIED = [0.05, 0.7, 0.2, 1.0]  # with L = 300, ramp 16: windows 64, 256, 128, 300 (kept length)
CASES = {
    "fixed-span": dict(attn_span=40),
    "adaptive-varied": dict(attn_span=300, adapt_span=True, adapt_span_ramp=16,
                            adapt_span_cache=True, spans=VARIED),
    "adaptive-short-trimmed": dict(attn_span=300, adapt_span=True, adapt_span_cache=True,
                                   spans=[0.0, 0.1, 0.05, 0.3]),
    "adaptive-reference-impl": dict(attn_span=300, adapt_span=True, adapt_span_ramp=16,
                                    adapt_span_cache=True, attn_impl="reference", spans=VARIED),
    "persistent-no-ff": dict(attn_span=150, adapt_span=True, pers_mem_size=8, spans=VARIED),
    "persistent-keep-ff-fixed-span": dict(attn_span=70, pers_mem_size=5, pers_mem_keep_ff=True),
    "adaptive-softmax": dict(vocab_size=300, adapt_io=True, adapt_io_cutoffs=[40, 120],
                             adapt_io_divval=2, adapt_span=True, spans=VARIED),
    "adaptive-softmax-tied": dict(vocab_size=300, adapt_io=True, adapt_io_tied=True,
                                  adapt_io_cutoffs=[40, 120], adapt_io_divval=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_models(case):
    """A 200-token prompt in blocks of 64 (the last one partial), then 120 positions."""
    model = random_model(1, **CASES[case])
    ids = torch.randint(model.cfg.vocab_size, (1, 320), generator=torch.Generator().manual_seed(2))
    check(model, ids, 200, 64)


def test_batch_of_prompts_and_shared_prompt():
    """Three streams: three different prompts, or one prompt and three continuations."""
    model = random_model(3, nheads=8, attn_span=260, adapt_span=True, adapt_span_cache=True,
                         spans=[0.0, 0.1, 0.1, 0.3, 0.02, 0.5, 0.9, 1.0])
    ids = torch.randint(23, (3, 200), generator=torch.Generator().manual_seed(4))  # (3, 200)
    check(model, ids, 90, 64)
    ids[1:, :90] = ids[0, :90]
    check(model, ids, 90, 64, shared=True)


def test_windows_are_the_models():
    """Each head's ring holds the grouped path's window: the span rounded up to 64 and
    at most the kept length; with --attn-impl reference, the kept length."""
    model = random_model(1, **{k: v for k, v in CASES["adaptive-varied"].items()})
    grouped = KVCache(model)
    grouped.prefill(torch.zeros(1, 1, dtype=torch.long), 64)
    # z = 0.05 * 300 = 15, 210, 60, 300; reach z + 16 + 1 -> 32, 227, 77, 300 (kept L' = 300)
    assert [[(g.window, g.stop - g.start) for g in p.groups] for p in grouped.plans] == \
        [[(64, 1), (128, 1), (256, 1), (300, 1)]] * 2
    assert grouped.memory_bytes() == 2 * 2 * (64 + 128 + 256 + 300) * 8 * 4  # layers, k+v, D, float32
    model.cfg.attn_impl = "reference"
    assert [[g.window for g in p.groups] for p in KVCache(model).plans] == [[300]] * 2
    with pytest.raises(ValueError, match="prefill first"):
        KVCache(model).step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="eval mode"):
        KVCache(model.train())


# ---- generate.py ----------------------------------------------------------------------------
def test_generate_same_tokens_with_and_without_kv_cache():
    model = random_model(5, attn_span=64, adapt_span=True, spans=[0.1, 0.5, 1.0, 0.0])
    prompt = list(range(20))
    for temperature in (0.0, 1.0):
        with_kv = list(generate.generate(model, prompt, 150, 16, temperature, 0, 7))
        without = list(generate.generate(model, prompt, 150, 16, temperature, 0, 7, kv_cache=False))
        assert with_kv == without
    batch = list(generate.generate_batch(model, prompt, 60, 16, 1.0, 5, 8, num_samples=3))
    assert batch == list(generate.generate_batch(model, prompt, 60, 16, 1.0, 5, 8, 3, False))
    assert len({tuple(row) for row in zip(*batch)}) == 3  # three different samples


def test_num_samples_cli(tmp_path, capsys):
    model = random_model(6, attn_span=32)
    vocab = Vocab([chr(ord("a") + i) for i in range(22)] + ["<eos>"], "chars")
    path = tmp_path / "m.pt"
    config = {"model": model.cfg.to_dict(), "train": asdict(TrainConfig(block_size=8)),
              "data": {"path": "unused", "unit": "bpc"}}
    torch.save({"format": ckpt_io.FORMAT, "config": config, "iter_no": 0, "model": model.state_dict(),
                "vocab": {"idx2word": vocab.idx2word, "style": vocab.style}}, path)
    common = ["--checkpoint", str(path), "--prompt", "abc", "--length", "30", "--seed", "3",
              "--device", "cpu", "--threads", "0"]
    assert generate.main(common + ["--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("=== sample ")[1:]
    assert [b.split(" ===\n")[0] for b in blocks] == ["1/3", "2/3", "3/3"]
    assert all(b.split(" ===\n")[1].startswith("abc") and len(b.split(" ===\n")[1]) == 3 + 30 + 1
               for b in blocks)
    assert generate.main(common + ["--no-kv-cache", "--num-samples", "3"]) == 0
    assert capsys.readouterr().out == out
    assert generate.main(common + ["--num-samples", "0"]) == 2
    assert "error: --num-samples" in capsys.readouterr().err
