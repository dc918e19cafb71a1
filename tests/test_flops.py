"""flops.py: forward FLOPs per token, checked against counts written out by hand,
against the windows the attention paths really use, and in main.py's log."""
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attention  # noqa: E402
import datagen  # noqa: E402
import flops  # noqa: E402
import main as entry  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402



def set_spans(model: TransformerSeq, values) -> None:
    """current_val per layer and head."""
    with torch.no_grad():
        for layer, vals in zip(model.layers, values):
            layer.span.current_val.copy_(torch.tensor(vals).view(-1, 1, 1))


def small(**overrides) -> TransformerSeq:
    torch.manual_seed(0)
    cfg = dict(vocab_size=10, hidden_size=8, nheads=2, inner_hidden_size=16, nlayers=1,
               attn_span=128, dropout=0.0, adapt_span=True)
    return TransformerSeq(ModelConfig(**{**cfg, **overrides}))


def test_hand_count_one_layer():
    model = small()
    set_spans(model, [[0.0, 1.0]])  # z = 0 and z = L: reach 33 -> window 64; reach 128 -> 128
    assert flops.layer_windows(model) == [[64, 128]]
    assert flops.layer_windows(model, "reference") == [[128, 128]]  # trim 0
    f = flops.flops_per_token(model)
    D = 4
    attn = 3 * 2 * D * 64 + 3 * 2 * D * 128  # content + position + probs@V: 1536 + 3072
    assert f.attn == attn == 4608
    assert f.attn_max == 3 * 2 * D * 128 * 2 == 6144
    projections = 4 * 2 * 8 * 8  # 512
    ff = 2 * 2 * 8 * 16  # 512
    output = 2 * 8 * 10  # 160
    assert f.model == projections + ff + attn + output == 5792


def test_hand_count_grouped_vs_reference_trim():
    model = small(attn_span=256, nlayers=2)
    # layer 0: z = 0 (span 32) and z = 100 (span 132): trim = (256 - 132) // 64 * 64 = 64, L' = 192;
    # grouped windows: reach 33 -> 64 and reach 133 -> 192. Layer 1: both heads at L = 256.
    set_spans(model, [[0.0, 100 / 256], [1.0, 1.0]])
    assert flops.layer_windows(model, "grouped") == [[64, 192], [256, 256]]
    assert flops.layer_windows(model, "reference") == [[192, 192], [256, 256]]
    assert flops.layer_windows(model, "max") == [[256, 256], [256, 256]]
    cfg = model.cfg
    assert flops.attention_flops(cfg, flops.layer_windows(model, "grouped")) == 24 * (64 + 192 + 512) == 18432
    assert flops.attention_flops(cfg, flops.layer_windows(model, "reference")) == 24 * (384 + 512) == 21504
    assert flops.flops_per_token(model).attn_max == 24 * 1024 == 24576
    reference = small(attn_span=256, nlayers=2, attn_impl="reference")
    set_spans(reference, [[0.0, 100 / 256], [1.0, 1.0]])
    f = flops.flops_per_token(reference)
    assert f.attn == 21504
    assert f.model == 2 * (512 + 512) + 21504 + 160


def test_hand_count_persistent_memory_without_ff():
    model = small(attn_span=32, adapt_span=False, pers_mem_size=3)
    f = flops.flops_per_token(model)
    assert flops.layer_windows(model) == [[32, 32]]  # no adaptive span: L everywhere
    pers = 2 * (2 * 4 * 3 + 2 * 3 * 4)  # two heads: logits q.key (D x N) and read probs@val (N x D)
    attn = 24 * (32 + 32)
    assert f.attn == f.attn_max == attn == 1536
    assert f.model == 512 + pers + attn + 160 == 2304  # no FF with persistent memory


def test_hand_count_keep_ff_with_persistent_memory():
    cfg = ModelConfig(vocab_size=10, hidden_size=8, nheads=2, inner_hidden_size=16, nlayers=3,
                      pers_mem_size=3, pers_mem_keep_ff=True)
    assert flops.layer_dense_flops(cfg) == 512 + 96 + 512


def test_hand_count_adaptive_io():
    # V = 20, cutoffs [5, 10]: clusters of 5, 5, 10 words with sizes 8, 4, 2 (divval 2)
    cfg = ModelConfig(vocab_size=20, hidden_size=8, nheads=2, adapt_io=True, adapt_io_cutoffs=[5, 10],
                      adapt_io_divval=2)
    adaptive_input = 2 * 8 * 8
    head = 2 * 8 * 8 + 2 * 8 * (5 + 2)  # projection + cluster-0 words and 2 cluster logits
    tails = (2 * 8 * 4 + 2 * 4 * 5) + (2 * 8 * 2 + 2 * 2 * 10)
    assert flops.io_flops(cfg) == adaptive_input + head + tails == 544
    assert flops.io_flops(ModelConfig(vocab_size=20, hidden_size=8)) == 2 * 8 * 20


def test_windows_are_those_the_grouped_path_scores(monkeypatch):
    """Record the window and head count of every banded product of a forward."""
    torch.manual_seed(1)
    model = TransformerSeq(ModelConfig(vocab_size=12, hidden_size=16, nheads=4, nlayers=2, attn_span=256,
                                       dropout=0.0, adapt_span=True, adapt_span_cache=True))
    set_spans(model, [[0.0, 0.25, 31 / 256, 0.5], [0.1, 0.1, 0.9, 0.0]])
    seen = [[] for _ in model.layers]
    original = attention.band_logits

    def spy(q, k, chunk):
        calls.append((k.size(2) - q.size(2), q.size(1)))  # W and the G heads of the group
        return original(q, k, chunk)

    monkeypatch.setattr(attention, "band_logits", spy)
    windows = flops.layer_windows(model, "grouped")
    for l, layer in enumerate(model.layers):  # one layer at a time, so the calls are attributed
        calls = []
        with torch.no_grad():
            layer.attn(torch.randn(1, 64, 16), torch.zeros(1, model.layer_cache_size(layer), 16), model.key_pe)
        seen[l] = sorted(w for w, g in calls for _ in range(g))
        groups, _ = attention.plan_groups(tuple(windows[l]), 1, 64, 4)  # merged by the cost model
        planned = [w for w, _, heads in groups
                   for _ in (range(4)[heads] if isinstance(heads, slice) else heads)]
        assert seen[l] == sorted(planned)  # the group order is the path's business
        # each head is scored over at least its own window
        assert all(a >= b for a, b in zip(seen[l], sorted(windows[l])))
    assert len({w for layer in seen for w in layer}) > 2  # the spans above give varied windows


def test_windows_are_those_the_reference_path_keeps(monkeypatch):
    torch.manual_seed(1)
    model = TransformerSeq(ModelConfig(vocab_size=12, hidden_size=16, nheads=4, nlayers=2, attn_span=256,
                                       dropout=0.0, adapt_span=True, attn_impl="reference"))
    set_spans(model, [[0.0, 0.25, 0.1, 0.5], [0.1, 0.1, 0.2, 0.0]])
    kept = []
    original = attention.fit_memory

    def spy(h_all, block, keep):
        kept.append(keep)
        return original(h_all, block, keep)

    monkeypatch.setattr(attention, "fit_memory", spy)
    with torch.no_grad():
        model(torch.randint(12, (1, 64)), model.init_cache(1))
    windows = flops.layer_windows(model)
    assert kept == [windows[0][0]] * 2 + [windows[1][0]] * 2  # keys and values of each layer
    assert windows == [[192] * 4, [128] * 4]


def test_format_and_metrics():
    assert flops.format_flops(1234.0) == "1.23k"
    assert flops.format_flops(302e6) == "302M"
    assert flops.format_flops(1.5e9) == "1.5G"
    assert flops.format_flops(12.0) == "12"
    f = flops.Flops(attn=2.36e6, attn_max=302e6, model=78.1e6)
    assert f.log_text() == "attn_flops/tok: 2.36M (max 302M) model_flops/tok: 78.1M"
    assert f.metrics() == {"flops/attn_flops": 2.36e6, "flops/attn_flops_max": 302e6,
                           "flops/model_flops": 78.1e6}


def test_training_log_has_flops_grad_norm_and_layer_spans(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_bytes(datagen.english(20000))
    logs = tmp_path / "logs"
    code = entry.main(["--data", str(data), "--nlayers", "2", "--hid-sz", "16", "--inner-hid-sz", "32",
                       "--nheads", "2", "--attn-span", "128", "--block-sz", "16", "--batch-sz", "2",
                       "--nbatches", "3", "--niter", "1", "--adapt-span", "--adapt-span-init", "0.5",
                       "--checkpoint", str(tmp_path / "c.pt"), "--tensorboard-dir", str(logs),
                       "--device", "cpu", "--optim", "adagrad", "--lr", "0.05"])
    assert code == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("steps: 3 ")][0]
    assert "attn_flops/tok: " in line and "(max 24.6k)" in line  # 2 layers x 2 heads x 6 x 8 x 128
    record = json.loads((logs / "metrics.jsonl").read_text().splitlines()[0])
    assert record["flops/attn_flops_max"] == 2 * 2 * 6 * 8 * 128
    assert record["flops/attn_flops"] <= record["flops/attn_flops_max"]
    assert math.isfinite(record["train/grad_norm"]) and record["train/grad_norm"] > 0
    assert {"span_avg/layer_00", "span_max/layer_00", "span_avg/layer_01", "span_max/layer_01"} <= set(record)
