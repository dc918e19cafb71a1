"""The streaming tokeniser (tokenizer.py) and the streamed cache build (data.load_corpus)
against a plain computation over whole files, with pieces small enough that their ends fall
inside lines, words and multi-byte characters, for byte-, character- and word-level data."""
import random

import numpy as np
import pytest

import data
import tokenizer
from data import DataConfig, load_corpus
from datagen import text8_like, wiki_markup, wikitext_lines, write_reference_folder
from tokenizer import EOS, SPLITS


def plain_tokens(path) -> list:
    """Every line of the whole file (read at once, universal newlines), ``line.split()`` + <eos>."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline (or is empty): no further line
    return [w for line in lines for w in line.split() + [EOS]]


def plain_corpus(paths: dict, sort_by_freq: bool = False):
    """Vocabulary by first appearance in train (or by the reference's frequency rule), ids."""
    words = {name: plain_tokens(paths[name]) for name in SPLITS}
    vocab = list(dict.fromkeys(words["train"]))
    if sort_by_freq:
        counts = {w: 0 for w in vocab}
        for w in words["train"]:
            counts[w] += 1
        first = {w: i for i, w in enumerate(vocab)}
        vocab = sorted(vocab, key=lambda w: (-counts[w], -first[w]))  # ties: later first
    index = {w: i for i, w in enumerate(vocab)}
    return vocab, {name: np.array([index[w] for w in words[name]], dtype=np.int64) for name in SPLITS}


def odd_text(seed: int, nlines: int = 400) -> str:
    """Word lines with unicode (2-, 3- and 4-byte characters), CR LF, lone CR, tabs, NEL and
    separator characters that str.split treats as whitespace, long words and blank lines."""
    rng = random.Random(seed)
    pieces = wikitext_lines(nlines, vocab_size=500, seed=seed)
    extra = ["héllo", "naïve", "日本語", "😀x", "€", "a\u00a0b", "x\x85y", "p\x1cq", "\t", "loooooooongword"]
    out = []
    for line in pieces:
        words = line.split(" ")
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(extra))
        out.append(" ".join(words) + rng.choice(["\n", "\n", "\r\n", "\r", " \n"]))
    return "".join(out)


def write_splits(folder, texts: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))
    return paths


def word_splits(folder, seed: int = 0) -> dict:
    train = odd_text(seed, 600)
    known = list(dict.fromkeys(train.split()))  # valid and test only use train's words
    return write_splits(folder, {"train": train + "\udcff\udcfe invalid-utf8 tail",
                                 "valid": " ".join(known[:300]) + "\n", "test": "  " + "\n".join(known[-200:])})


def assert_same(got_vocab, got_ids, want_vocab, want_ids):
    assert got_vocab == want_vocab
    for name in SPLITS:
        np.testing.assert_array_equal(np.asarray(got_ids[name], dtype=np.int64), want_ids[name])


@pytest.mark.parametrize("chunk", [5, 64, 4099])
@pytest.mark.parametrize("kind", ["enwik8", "text8"])
def test_vectorised_pieces_give_the_plain_tokens(tmp_path, monkeypatch, kind, chunk):
    """Byte pieces cut inside lines (text8 is one line) at every size give the plain ids."""
    raw = wiki_markup(60_000, seed=3) if kind == "enwik8" else text8_like(60_000, seed=3)
    folder = write_reference_folder(tmp_path / kind, raw, 5_000, style=kind)
    paths = {name: folder / f"{name}.txt" for name in SPLITS}
    monkeypatch.setattr(tokenizer, "CHUNK_BYTES", chunk)
    assert len(list(tokenizer.byte_pieces(paths["train"]))) > 3 or chunk > 4000
    assert_same(*tokenizer.tokenize_splits(paths), *plain_corpus(paths))


@pytest.mark.parametrize("chars", [1, 7, 100, 5000])
def test_python_pieces_give_the_plain_tokens(tmp_path, monkeypatch, chars):
    """Word-level text with unicode, CR LF / CR, unicode whitespace and invalid UTF-8: the
    pieces end inside words and (in the decoder's reads) inside multi-byte characters."""
    paths = word_splits(tmp_path / "words")
    assert any(b >= 0xF0 for b in paths["train"].read_bytes())  # 4-byte characters occur
    monkeypatch.setattr(tokenizer, "CHUNK_CHARS", chars)
    assert_same(*tokenizer.tokenize_splits(paths), *plain_corpus(paths))


def test_text_that_needs_python_late_in_a_file_is_tokenised_again(tmp_path, monkeypatch):
    """The vectorised path gives up on the last piece (a unicode word): the result is Python's."""
    paths = write_splits(tmp_path / "late", {"train": "1 2 3\n" * 2000 + "4 é\n", "valid": "1 é\n", "test": "2"})
    monkeypatch.setattr(tokenizer, "CHUNK_BYTES", 1000)
    assert_same(*tokenizer.tokenize_splits(paths), *plain_corpus(paths))


@pytest.mark.parametrize("sort_by_freq", [False, True])
@pytest.mark.parametrize("kind", ["enwik8", "words"])
def test_cache_build_gives_the_plain_arrays(tmp_path, monkeypatch, kind, sort_by_freq):
    """load_corpus's streamed cache (raw id files, renumbered and narrowed on the way to .npy)
    equals the plain computation, is memory mapped, and leaves no temporary file."""
    if kind == "enwik8":
        folder = write_reference_folder(tmp_path / "src", wiki_markup(50_000, seed=5), 4_000)
    else:
        folder = word_splits(tmp_path / "src", seed=1)["train"].parent
    paths = {name: folder / f"{name}.txt" for name in SPLITS}
    monkeypatch.setattr(tokenizer, "CHUNK_BYTES", 333)
    monkeypatch.setattr(tokenizer, "CHUNK_CHARS", 333)
    cache = tmp_path / "cache"
    corpus = load_corpus(DataConfig(str(folder), sort_by_freq=sort_by_freq, cache_dir=str(cache)))
    vocab, ids = plain_corpus(paths, sort_by_freq)
    assert_same(corpus.vocab.idx2word, {n: corpus.split(n) for n in SPLITS}, vocab, ids)
    assert corpus.train.dtype == data.compact_dtype(len(vocab)) and isinstance(corpus.train, np.memmap)
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "test.npy", "train.npy", "valid.npy"]
    again = load_corpus(DataConfig(str(folder), sort_by_freq=sort_by_freq, cache_dir=str(cache)))
    assert_same(again.vocab.idx2word, {n: again.split(n) for n in SPLITS}, vocab, ids)


def test_plain_file_is_copied_in_pieces_and_an_unwritable_cache_builds_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "text.bin"
    raw = bytes(random.Random(0).randrange(256) for _ in range(10_007))
    path.write_bytes(raw)
    monkeypatch.setattr(data, "COPY_BYTES", 100)
    cfg = DataConfig(str(path), split=(0.7, 0.2, 0.1), cache_dir=str(tmp_path / "cache"))
    want = np.split(np.frombuffer(raw, dtype=np.uint8), [7004, 7004 + 2001])
    corpus = load_corpus(cfg)
    monkeypatch.setattr(data.corpus_cache.Entry, "open", classmethod(lambda cls, folder: None))
    in_memory = load_corpus(DataConfig(str(path), split=(0.7, 0.2, 0.1), cache_dir=str(tmp_path / "other")))
    assert not (tmp_path / "other").exists() and not isinstance(in_memory.train, np.memmap)
    for got in (corpus, in_memory):
        for name, array in zip(SPLITS, want):
            np.testing.assert_array_equal(got.split(name), array)
            assert got.split(name).dtype == np.uint8
    words = word_splits(tmp_path / "w")["train"].parent
    built = load_corpus(DataConfig(str(words), sort_by_freq=True, cache_dir=str(tmp_path / "other")))
    assert_same(built.vocab.idx2word, {n: built.split(n) for n in SPLITS},
                *plain_corpus({n: words / f"{n}.txt" for n in SPLITS}, True))


def test_an_unseen_token_leaves_no_partial_entry(tmp_path):
    paths = write_splits(tmp_path / "bad", {"train": "1 2\n" * 100, "valid": "1 3\n", "test": "1\n"})
    cache = tmp_path / "cache"
    with pytest.raises(data.ConfigError, match=r"valid\.txt: token '3'"):
        load_corpus(DataConfig(str(paths["train"].parent), cache_dir=str(cache)))
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_cache_memory_script_reports_the_build(tmp_path):
    """scripts/cache_memory.py (the command docs/data.md quotes) on 1 MB of generated words:
    it builds a cache of the plain token count and reports its figures (not asserted: measured)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "scripts/cache_memory.py", "--generate", "words", "--mb", "1",
                           "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["built"] and r["tokens"] > 100_000 and r["cache_mb"] == pytest.approx(r["tokens"] * 2 / 2**20)
    assert {"build_peak_mb", "process_peak_mb", "rss_before_mb", "bound_mb"} <= set(r)
    assert proc.stdout.startswith("token cache build (words): source 1 MB") and "build peak" in proc.stdout
