import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import data
import tokenizer
from data import (EOS, DataConfig, Stream, Vocab, batchify, eval_rows, load_corpus, sort_by_frequency,
                  tokenize_splits)
from datagen import fixture_folder
from utils import ConfigError



def reference_tokenize(paths):
    """The reference rule written plainly: line.split() + ['<eos>'], vocabulary from train."""
    index, ids = {}, {}
    for name in data.SPLITS:
        out = []
        with open(paths[name], encoding="utf-8") as f:
            for line in f:
                for w in line.split() + [EOS]:
                    if name == "train":
                        index.setdefault(w, len(index))
                    out.append(index[w])
        ids[name] = np.array(out)
    return list(index), ids


def write_splits(folder: Path, texts: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_bytes(text.encode())
    return paths


@pytest.mark.parametrize("texts", [
    {"train": "1 2 3\n4 5\n\n6 2\n", "valid": "2 3\n", "test": "5 6"},  # last line without newline
    {"train": "a b\tc  d\n_ a\x0bb\n", "valid": "a\n\n", "test": "d c"},  # tabs, vertical tab, blank lines
    {"train": "héllo wörld\nfoo <eos> bar\n", "valid": "foo\n", "test": "bar héllo"},  # unicode, literal <eos>
    {"train": "long tokens here\r\nand crlf\n", "valid": "and\n", "test": "here"},  # Python path
])
def test_tokenize_matches_reference_rule(tmp_path, texts):
    paths = write_splits(tmp_path, texts)
    vocab, ids = tokenize_splits(paths)
    ref_vocab, ref_ids = reference_tokenize(paths)
    assert vocab == ref_vocab
    for name in data.SPLITS:
        np.testing.assert_array_equal(ids[name], ref_ids[name])


@pytest.mark.parametrize("fixture", ["F1-text8-span", "F2-enwik8-pers-span"])
def test_fixture_vocabulary_is_the_references(fixture):
    folder = fixture_folder(fixture)  # read only: tokenize_splits writes no cache
    expected = json.loads((folder / "expected.json").read_text())
    paths = {name: folder / "data" / f"{name}.txt" for name in data.SPLITS}
    vocab, ids = tokenize_splits(paths)
    assert vocab == expected["vocab_idx2word"]
    stream = expected["stream"]["token_ids"]
    np.testing.assert_array_equal(ids["test"][: len(stream)], stream)
    # the vectorised path agrees with Python's split on the whole file
    index = {w: i for i, w in enumerate(vocab)}
    sink = tokenizer.IdSink()
    tokenizer.python_ids(paths["valid"], index, False, sink)
    np.testing.assert_array_equal(ids["valid"], np.concatenate(list(sink.pieces())))


def test_unseen_token_is_a_clear_error(tmp_path):
    for texts in ({"train": "1 2\n", "valid": "1 3\n", "test": "1\n"},
                  {"train": "alpha beta\n", "valid": "alpha gamma\n", "test": "beta\n"}):
        paths = write_splits(tmp_path / texts["train"][:2], texts)
        with pytest.raises(ConfigError, match=r"valid\.txt: token '(3|gamma)'"):
            tokenize_splits(paths)


def test_frequency_order_and_tie_rule():
    idx2word = ["a", "b", "c", "d", EOS]
    train = np.array([0, 1, 2, 3, 4, 2, 2, 1, 4])  # counts a1 b2 c3 d1 eos2
    words, ids = sort_by_frequency(idx2word, {"train": train, "valid": np.array([3, 0])})
    # most frequent first; equal counts in reverse order of first appearance
    assert words == ["c", EOS, "b", "d", "a"]
    assert [words[i] for i in ids["train"]] == [idx2word[i] for i in train]
    assert ids["valid"].tolist() == [3, 4]


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    source, cache = tmp_path / "data", tmp_path / "cache"
    paths = write_splits(source, {"train": "1 2 3\n" * 50, "valid": "1 2\n", "test": "3 1\n"})
    corpus = load_corpus(DataConfig(str(source), cache_dir=str(cache)))
    assert corpus.vocab.idx2word == ["1", "2", "3", EOS] and corpus.vocab.style == "enwik8"
    cached = list(cache.glob("data-*/train.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), corpus.train)
    assert sorted(p.name for p in source.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    time.sleep(0.01)
    paths["train"].write_text("4 1 2 3\n" * 50)
    os.utime(paths["train"], ns=(time.time_ns(), time.time_ns()))
    corpus = load_corpus(DataConfig(str(source), cache_dir=str(cache)))
    assert corpus.vocab.idx2word[0] == "4"


def test_rewrite_with_the_same_size_and_time_is_not_served_from_the_cache(tmp_path):
    """The cache key is the content: same size, same mtime, other bytes -> other tokens."""
    path, cache = tmp_path / "text.txt", tmp_path / "cache"
    path.write_bytes(b"abcdefgh" * 40)
    cfg = DataConfig(str(path), cache_dir=str(cache))
    first = load_corpus(cfg)
    stat = path.stat()
    path.write_bytes(b"ABCDEFGH" * 40)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    data.corpus_cache._memo.clear()  # a new process: nothing remembered
    second = load_corpus(cfg)
    assert bytes(second.train[:8].tolist()) == b"ABCDEFGH" and bytes(first.train[:8].tolist()) == b"abcdefgh"
    assert first.fingerprint["size"] == second.fingerprint["size"]
    assert first.fingerprint["sha256"] != second.fingerprint["sha256"]
    assert len(list(cache.iterdir())) == 2


def test_cache_goes_to_the_cache_folder_by_default(tmp_path, monkeypatch):
    """--cache-dir, else $ADAPTIVE_SPAN_CACHE, else $XDG_CACHE_HOME/adaptive-span; never the data folder."""
    path = tmp_path / "data" / "text.txt"
    path.parent.mkdir()
    path.write_bytes(b"some text for the cache\n" * 20)
    monkeypatch.delenv("ADAPTIVE_SPAN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_corpus(DataConfig(str(path)))
    assert [p.name for p in path.parent.iterdir()] == ["text.txt"]
    (entry,) = (tmp_path / "xdg" / "adaptive-span").iterdir()
    assert entry.name.startswith("text.txt-") and (entry / "meta.json").is_file()
    monkeypatch.setenv("ADAPTIVE_SPAN_CACHE", str(tmp_path / "env"))
    load_corpus(DataConfig(str(path)))
    assert len(list((tmp_path / "env").iterdir())) == 1
    load_corpus(DataConfig(str(path), cache_dir=str(path.parent)))  # asked for: the data folder
    assert len(list(path.parent.iterdir())) == 2


@pytest.mark.parametrize("split,sizes", [((0.9, 0.05, 0.05), (900, 50, 50)), ((0.5, 0.3, 0.2), (500, 300, 200))])
def test_split_uses_all_three_fractions(split, sizes):
    assert data.split_sizes(1000, split) == sizes


@pytest.mark.parametrize("split", [(0.1, 0.1, 0.1), (0.5, 0.3, 0.3), (1.0, 0.0, 0.0), (0.9, -0.05, 0.15)])
def test_split_that_is_not_three_positive_fractions_summing_to_one_is_refused(split):
    with pytest.raises(ConfigError, match=r"--data-split .*sum to 1"):
        data.check_split(split)


def test_plain_file_is_byte_level_with_a_90_5_5_split(tmp_path):
    text = ("To be, or not to be: that is the question.\n" * 100).encode()
    (tmp_path / "play.txt").write_bytes(text)
    corpus = load_corpus(DataConfig(str(tmp_path / "play.txt")))
    assert len(corpus.vocab) == 256 and corpus.vocab.style == "bytes"
    assert (len(corpus.train), len(corpus.valid)) == (int(len(text) * 0.9), int(len(text) * 0.05))
    joined = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert bytes(joined.tolist()) == text
    assert corpus.vocab.decode(corpus.train[:5].tolist()) == "To be"


def test_missing_or_malformed_data_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder.*get_data.sh"):
        load_corpus(DataConfig(str(tmp_path / "nope")))
    (tmp_path / "train.txt").write_text("1 2\n")
    with pytest.raises(ConfigError, match="neither train.txt"):
        load_corpus(DataConfig(str(tmp_path)))


def test_stream_reads_shifted_blocks_and_wraps_to_a_seeded_offset():
    ids = np.arange(2 * 40)
    rows = batchify(ids, 2)  # (2, 40)
    stream = Stream(rows, block=8, seed=3)
    x, y = stream.next_block()
    assert x[1].tolist() == list(range(40, 48)) and y[1].tolist() == list(range(41, 49))
    wraps = [stream.advance() for _ in range(4)]
    # positions 8, 16, 24, then 32 >= 40 - 8 wraps to randrange(8) with the stream's own seed
    assert wraps == [False, False, False, True]
    import random
    assert stream.pos == random.Random(3).randrange(8)
    state = stream.state_dict()
    other = Stream(rows, block=8, seed=99)
    other.load_state_dict(state)
    assert [other.advance() or other.pos for _ in range(6)] == [stream.advance() or stream.pos for _ in range(6)]


@pytest.mark.parametrize("length,nrows", [(101, 4), (100, 3), (9, 8)])
def test_eval_rows_score_every_token_once(length, nrows):
    ids = np.arange(length) * 7 % 13
    inputs, targets, mask = eval_rows(ids, nrows)
    for r in range(nrows):
        n = mask[r].sum()
        assert mask[r, :n].all() and not mask[r, n:].any()  # padding only at the end
    scored = np.concatenate([targets[r, mask[r]] for r in range(nrows)])
    np.testing.assert_array_equal(scored, ids[1:])  # every token but the first, in order
    fed = np.concatenate([inputs[r, mask[r]] for r in range(nrows)])
    np.testing.assert_array_equal(fed, ids[:-1])  # each predicted from its predecessor


def test_vocab_round_trips_text():
    chars = Vocab(["a", "_", "b", EOS], "chars")
    assert chars.decode(chars.encode("ab a\nb")) == "ab a\nb"
    enwik8 = Vocab([str(b) for b in b"hi \n"[:3]] + [EOS], "enwik8")
    assert enwik8.decode(enwik8.encode("hi\nih")) == "hi\nih"
    words = Vocab(["the", "cat", EOS], "words")
    assert words.decode(words.encode("the cat\ncat")) == "the cat\ncat"
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        words.encode("the dog")


def test_read_only_data_folder_is_never_written(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    write_splits(folder, {"train": "1 2 3\n" * 20, "valid": "1 2\n", "test": "3 1\n"})
    monkeypatch.setenv("ADAPTIVE_SPAN_CACHE", str(tmp_path / "cache"))
    folder.chmod(0o555)  # root may still write: the permission bits decide
    try:
        corpus = load_corpus(DataConfig(str(folder)))
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert list((tmp_path / "cache").glob("ro-*/train.npy"))
    assert len(corpus.vocab) == 4


def test_unwritable_cache_folder_works_from_memory(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"hello world\n" * 30)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    corpus = load_corpus(DataConfig(str(path), cache_dir=str(blocker / "cache")))
    assert bytes(corpus.train[:5].tolist()) == b"hello" and blocker.read_text() == "x"
