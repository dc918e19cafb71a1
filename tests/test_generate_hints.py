"""scripts/generate.py's hints: one warning line for prompt tokens outside the vocabulary or
never in the training text, and a --help whose every default is exact."""
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import checkpoint as ckpt_io  # noqa: E402
import corpus_cache  # noqa: E402
import generate  # noqa: E402
from data import EOS, Vocab  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from trainer import TrainConfig  # noqa: E402

BYTES = Vocab([str(b) for b in range(256)], "bytes")


def warnings(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_bytes_never_in_the_training_text_are_named(capsys):
    seen = set(b"abc def\n")
    ids = generate.prompt_ids(BYTES, "ab €漢字", seen)
    assert ids == list("ab €漢字".encode())  # nothing left out: every byte is in the vocabulary
    lines = warnings(capsys.readouterr().err)
    assert lines == ["warning: --prompt: 9 of its 12 bytes ('€' '漢' '字') are never in the training "
                     "text: the model has not learned them"]
    assert generate.prompt_ids(BYTES, "bad cafe", seen) == list(b"bad cafe")
    assert warnings(capsys.readouterr().err) == []


def test_words_outside_the_vocabulary_are_left_out_or_unk(capsys):
    words = Vocab(["the", "cat", EOS], "words")
    assert generate.prompt_ids(words, "the dog cat\nthe emu", None) == [0, 1, 2, 0]
    assert warnings(capsys.readouterr().err) == [
        "warning: --prompt: 2 of its 6 words ('dog' 'emu') are not in the vocabulary, left out"]
    unk = Vocab(["the", "<unk>", EOS], "words")
    assert generate.prompt_ids(unk, "the dog", None) == [0, 1]
    assert "given as <unk>" in capsys.readouterr().err
    chars = Vocab(["a", "b", "_", EOS], "chars")
    assert generate.prompt_ids(chars, "a b€", None) == [0, 2, 1]
    assert warnings(capsys.readouterr().err) == [
        "warning: --prompt: 1 of its 4 characters ('€') are not in the vocabulary, left out"]


def test_a_prompt_with_no_known_token_is_an_error():
    words = Vocab(["the", EOS], "words")
    try:
        generate.prompt_ids(words, "zebra", None)
    except generate.ConfigError as err:
        assert "none of its tokens" in str(err)
    else:
        raise AssertionError("no error")


def save_bytes_model(tmp_path: Path, text_path: Path, fingerprint) -> Path:
    torch.manual_seed(0)
    model = TransformerSeq(ModelConfig(vocab_size=256, hidden_size=16, inner_hidden_size=32, nlayers=1,
                                       nheads=2, attn_span=16, dropout=0.0))
    config = {"model": model.cfg.to_dict(), "train": asdict(TrainConfig(block_size=8)),
              "data": {"path": str(text_path), "unit": "bpc", "fingerprint": fingerprint,
                       "split": [0.9, 0.05, 0.05]}}
    path = tmp_path / "m.pt"
    torch.save({"format": ckpt_io.FORMAT, "config": config, "iter_no": 0, "model": model.state_dict(),
                "vocab": {"idx2word": BYTES.idx2word, "style": "bytes"}}, path)
    return path


def test_generate_warns_once_from_the_training_file(tmp_path, capsys):
    """The issue's case: a model trained on ASCII text, prompted with '€漢字'."""
    text = tmp_path / "code.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 200 + "é".encode() * 40)  # é only in valid/test
    ckpt = save_bytes_model(tmp_path, text, corpus_cache.fingerprint([text]))
    args = ["--checkpoint", str(ckpt), "--length", "5", "--device", "cpu", "--threads", "1"]
    assert generate.main(args + ["--prompt", "€漢字é"]) == 0
    err = capsys.readouterr().err
    assert warnings(err) == ["warning: --prompt: 11 of its 11 bytes ('€' '漢' '字' 'é') are never in the "
                             "training text: the model has not learned them"]
    assert "threads: 1 (--threads)" in err
    assert generate.main(args + ["--prompt", "def "]) == 0
    assert warnings(capsys.readouterr().err) == []
    text.write_bytes(b"another text")  # changed since training: nothing known, nothing said
    assert generate.main(args + ["--prompt", "€"]) == 0
    assert warnings(capsys.readouterr().err) == []


def test_help_defaults_are_exact():
    text = " ".join(generate.build_parser().format_help().split())
    block = text[text.index("--no-kv-cache"):text.index("--device")]
    assert "(default: off, the key/value cache is used)" in block and "(default: on)" not in block
    block = text[text.index("--threads"):]
    assert "(default: 0, chosen by threads.py" in block and block.count("(default") >= 1


def test_checkpoint_record_of_trained_bytes(tmp_path, capsys):
    """data.trained_token_ids (what main.py keeps as vocab['seen']) is what generate.py reads first."""
    import numpy as np
    from data import Corpus, trained_token_ids
    train = np.frombuffer(b"hello world", np.uint8)
    corpus = Corpus(BYTES, train, train[:0], train[:0])
    seen = trained_token_ids(corpus)
    assert seen == sorted(set(b"hello world"))
    words = Corpus(Vocab(["a", EOS], "words"), np.zeros(3, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint8))
    assert trained_token_ids(words) is None
    ckpt = {"vocab": {"idx2word": BYTES.idx2word, "style": "bytes", "seen": seen},
            "config": {"data": {"path": str(tmp_path / "gone.txt")}}}  # the file is not needed
    assert generate.trained_ids(ckpt, BYTES) == set(b"hello world")
    generate.prompt_ids(BYTES, "hello €", generate.trained_ids(ckpt, BYTES))
    assert warnings(capsys.readouterr().err) == [
        "warning: --prompt: 3 of its 9 bytes ('€') are never in the training text: the model has not "
        "learned them"]
