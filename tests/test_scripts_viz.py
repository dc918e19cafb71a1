"""scripts/plot_spans.py, plots.py and scripts/generate.py: the spans read from
checkpoints, the PNG figures, streamed decoding, sampling, and cached generation
against a forward over the whole prefix."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import checkpoint as ckpt_io  # noqa: E402
import generate  # noqa: E402
import plot_spans  # noqa: E402
import plots  # noqa: E402
from data import Vocab  # noqa: E402
from datagen import FIXTURES, fixture_folder  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from trainer import TrainConfig  # noqa: E402
from train_state import load_model_state  # noqa: E402

F4 = FIXTURES / "F4-text8-varied-spans"
F4_CONFIG = dict(vocab_size=28, hidden_size=64, inner_hidden_size=256, nlayers=2, nheads=4, attn_span=256,
                 dropout=0.0, adapt_span=True, adapt_span_cache=True)
F4_FLAGS = ["--nlayers", "2", "--hid-sz", "64", "--inner-hid-sz", "256", "--nheads", "4", "--attn-span", "256",
            "--block-sz", "64", "--dropout", "0", "--adapt-span", "--adapt-span-cache"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_thread():
    """One-token steps run fastest on one thread (the setting generate.py uses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def need(path: Path) -> None:
    fixture_folder(path.relative_to(FIXTURES).parts[0])  # skips, naming the folder, when absent


@pytest.fixture(scope="module")
def f4():
    """The F4 reference checkpoint, its model and its vocabulary."""
    need(F4 / "checkpoint.pt")
    ckpt = ckpt_io.load_checkpoint(F4 / "checkpoint.pt")
    expected = json.loads((F4 / "expected.json").read_text())
    model = TransformerSeq(ModelConfig(**F4_CONFIG))
    load_model_state(model, ckpt, F4)
    return ckpt, model.eval(), Vocab(expected["vocab_idx2word"], "chars"), expected


def save_ours(path: Path, model: TransformerSeq, vocab: Vocab, block: int) -> Path:
    """A checkpoint in our format holding ``model`` (config, vocabulary, weights)."""
    config = {"model": model.cfg.to_dict(), "train": asdict(TrainConfig(block_size=block)),
              "data": {"path": "unused", "unit": "bpc"}}
    torch.save({"format": ckpt_io.FORMAT, "config": config, "iter_no": 0, "model": model.state_dict(),
                "vocab": {"idx2word": vocab.idx2word, "style": vocab.style}}, path)
    return path


# ---- spans of a checkpoint ---------------------------------------------------------
def test_reference_checkpoint_spans(f4):
    ckpt, model, _, _ = f4
    spans, L = plot_spans.checkpoint_spans(ckpt)
    # current_val (0.45, 0.3, 0.05, 0.2), (0.02, 0.7, 0.15, 1.0) x 256 = z; span = ceil(z) + 32, at most 256
    assert spans == [[116 + 32, 77 + 32, 13 + 32, 52 + 32], [6 + 32, 180 + 32, 39 + 32, 256]]
    assert L == 256
    assert spans == model.head_spans()
    assert plot_spans.checkpoint_spans(ckpt, ramp=0)[0] == [[116, 77, 13, 52], [6, 180, 39, 256]]


def test_our_checkpoint_spans_use_its_ramp(f4, tmp_path):
    _, model, vocab, _ = f4
    small = TransformerSeq(ModelConfig(**{**F4_CONFIG, "adapt_span_ramp": 16}))
    small.load_state_dict(model.state_dict())
    ckpt = ckpt_io.load_checkpoint(save_ours(tmp_path / "ours.pt", small, vocab, 64))
    assert plot_spans.checkpoint_spans(ckpt)[0] == [[132, 93, 29, 68], [22, 196, 55, 256]]


def test_fixed_span_checkpoint(tmp_path):
    model = TransformerSeq(ModelConfig(vocab_size=5, hidden_size=8, nheads=2, nlayers=3, attn_span=48))
    ckpt = {"model": {"module." + k: v for k, v in model.state_dict().items()}, "iter_no": 0}
    assert plot_spans.checkpoint_spans(ckpt) == ([[48, 48]] * 3, 48)


# ---- figures -------------------------------------------------------------------------
def test_spans_png_from_reference_checkpoint(f4, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "spans.png"
    assert plot_spans.main([str(F4 / "checkpoint.pt"), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert "layer 1: 38 212 71 256" in capsys.readouterr().out


def test_spans_figure_array():
    pytest.importorskip("matplotlib")
    image = plots.spans_figure([[40, 300, 8192], [33, 33, 1000]], 8192)
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 100 and image.std() > 10  # drawn, not blank


def test_spans_image_is_none_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert plots.spans_image([[40, 300]], 512) is None


def test_flops_png_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, attn in ((100, 9e6), (200, 5e6), (300, 2e6)):
            f.write(json.dumps({"step": step, "flops/attn_flops": attn, "flops/attn_flops_max": 3e8,
                                "flops/model_flops": 7.5e7 + attn}) + "\n")
        f.write(json.dumps({"step": 300, "val/bpc": 1.5}) + "\n")  # records without FLOPs are skipped
    out = tmp_path / "flops.png"
    assert plot_spans.main(["--flops", str(tmp_path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert plot_spans.main(["--flops", str(tmp_path / "missing")]) == 2


# ---- decoding and sampling -------------------------------------------------------------
@pytest.mark.parametrize("style, idx2word, ids, text", [
    ("chars", ["a", "_", "b", "<eos>"], [0, 1, 2, 3, 0], "a b\na"),
    ("bytes", [str(b) for b in range(256)], list("héllo\n".encode()), "héllo\n"),  # é is two tokens
    ("enwik8", ["104", "195", "169", "<eos>"], [0, 1, 2, 3, 0], "hé\nh"),
    ("words", ["the", "cat", "<eos>"], [0, 1, 2, 0, 0, 2, 1], "the cat\nthe the\ncat"),
])
def test_stream_decoder_one_token_at_a_time(style, idx2word, ids, text):
    vocab = Vocab(idx2word, style)
    decoder = generate.StreamDecoder(vocab)
    pieces = [decoder.feed([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    if style != "words":
        assert text == vocab.decode(ids)


def test_sample_greedy_and_top_k():
    log_probs = torch.log_softmax(torch.tensor([0.0, 2.0, 1.9, -1.0, 0.5]), dim=0)
    g = torch.Generator().manual_seed(0)
    assert generate.sample(log_probs, 0.0, 0, g) == 1
    assert all(generate.sample(log_probs, 5.0, 1, g) == 1 for _ in range(20))
    drawn = {generate.sample(log_probs, 1.0, 2, g) for _ in range(200)}
    assert drawn == {1, 2}
    assert {generate.sample(log_probs, 1.0, 0, g) for _ in range(400)} == {0, 1, 2, 3, 4}


# ---- cached generation ------------------------------------------------------------------
def whole_prefix(model: TransformerSeq, ids) -> torch.Tensor:
    with torch.no_grad():
        log_probs, _ = model(torch.tensor([ids]), model.init_cache(1))  # (1, P, V)
    return log_probs[0]  # (P, V)


def test_cache_matches_whole_prefix_fixture(f4, one_thread):
    """F4 (varied spans, trimming, adaptive cache): one token per step, or blocks of 64
    then one per step, equal one forward over all 200 tokens (L = 256 >= 200)."""
    _, model, _, expected = f4
    ids = expected["stream"]["token_ids"][:200]
    whole = whole_prefix(model, ids)  # (200, V)
    step_by_step, _ = generate.feed(model, ids, model.init_cache(1), 1)  # (200, V)
    log_probs, caches = generate.feed(model, ids[:128], model.init_cache(1), 64)  # (128, V)
    rest, _ = generate.feed(model, ids[128:], caches, 1)  # (72, V)
    torch.testing.assert_close(step_by_step, whole, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.cat([log_probs, rest]), whole, atol=2e-5, rtol=0)


def test_cache_matches_whole_prefix_fixed_span(one_thread):
    torch.manual_seed(3)
    model = TransformerSeq(ModelConfig(vocab_size=11, hidden_size=16, nheads=2, nlayers=3, attn_span=64,
                                       inner_hidden_size=32, dropout=0.0)).eval()
    ids = torch.randint(11, (50,)).tolist()
    step_by_step, _ = generate.feed(model, ids, model.init_cache(1), 1)
    torch.testing.assert_close(step_by_step, whole_prefix(model, ids), atol=2e-5, rtol=0)


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_generation_is_reproducible_with_a_seed(f4, tmp_path, capsys, one_thread):
    _, model, vocab, _ = f4
    path = save_ours(tmp_path / "f4.pt", model, vocab, 64)
    common = ["--checkpoint", path, "--prompt", "the meaning of life is", "--length", 60, "--device", "cpu"]
    first, second = run_script(*common, "--seed", 5), run_script(*common, "--seed", 5)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert generate.main([*map(str, common), "--seed", "6", "--threads", "0"]) == 0
    assert capsys.readouterr().out != first.stdout
    text = first.stdout
    assert text.startswith("the meaning of life is") and text.endswith("\n")
    assert len(text) == len("the meaning of life is") + 60 + 1
    assert set(text[:-1]) <= set("abcdefghijklmnopqrstuvwxyz \n")
    assert "tokens/s" in first.stderr


def test_reference_checkpoint_with_data_and_flags(f4, tmp_path, capsys, one_thread):
    """The same text from the reference checkpoint (vocabulary from --data) as from
    our checkpoint of the same model."""
    _, model, vocab, _ = f4
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):  # every character once, in the fixture's id order
        (data / f"{split}.txt").write_text(" ".join(vocab.idx2word[:-1]) + "\n")
    common = ["--prompt", "anarchism", "--length", "40", "--seed", "9", "--threads", "0", "--device", "cpu"]
    assert generate.main(["--checkpoint", str(F4 / "checkpoint.pt"), "--data", str(data), *F4_FLAGS,
                          *common]) == 0
    from_reference = capsys.readouterr().out
    assert generate.main(["--checkpoint", str(save_ours(tmp_path / "f4.pt", model, vocab, 64)), *common]) == 0
    assert capsys.readouterr().out == from_reference
    assert generate.main(["--checkpoint", str(F4 / "checkpoint.pt"), *F4_FLAGS, *common]) == 2  # no --data


@pytest.mark.parametrize("style, idx2word, prompt", [
    ("words", ["<eos>", "the", "cat", "sat", "on", "mat", "."], "the cat"),
    ("bytes", [str(b) for b in range(256)], "héllo"),
])
def test_word_and_byte_vocabularies(tmp_path, capsys, style, idx2word, prompt):
    torch.manual_seed(0)
    vocab = Vocab(idx2word, style)
    model = TransformerSeq(ModelConfig(vocab_size=len(vocab), hidden_size=16, nheads=2, nlayers=1,
                                       attn_span=32, inner_hidden_size=16, dropout=0.0))
    path = save_ours(tmp_path / "m.pt", model, vocab, 8)
    assert generate.main(["--checkpoint", str(path), "--prompt", prompt, "--length", "20",
                          "--temperature", "0", "--threads", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    ids = vocab.encode(prompt)
    greedy = list(generate.generate(model.eval(), ids, 20, 8, 0.0, 0, 0))
    decoder = generate.StreamDecoder(vocab)
    assert out == decoder.feed(ids) + decoder.feed(greedy) + decoder.flush() + "\n"
