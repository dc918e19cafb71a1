"""Corpora and token streams.

Formats read by ``load_corpus``:
- a reference-format folder ``DIR/{train,valid,test}.txt`` (what ``scripts/get_data.sh``
  prepares): every line is ``line.split()`` followed by ``<eos>``, the vocabulary
  comes from train in order of first appearance (by training frequency with
  ``--adapt-io``; ties in reverse order of first appearance, as the reference);
- a WikiText folder ``DIR/wiki.{train,valid,test}.tokens``: the same rules;
- any other file: raw bytes (vocabulary of 256), split 90/5/5 by default.

The tokenised splits are written, streamed, into a cache folder keyed by the data's path
and content (tokenizer.py, corpus_cache.py) and memory mapped from there;
``Corpus.fingerprint`` is the data's size and sha256.
"""
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import corpus_cache
from config import SPLIT, DataConfig  # noqa: F401  (DataConfig: importable from here)
from tokenizer import EOS, SPLITS, IdSink, frequency_remap, sort_by_frequency, tokenize_into, tokenize_splits  # noqa: F401
from utils import ConfigError

COPY_BYTES = 1 << 22  # a plain file is copied into its cache in pieces of 4 MB
DATASETS = ("enwik8", "text8", "wikitext-103")  # what scripts/get_data.sh prepares


@dataclass
class Vocab:
    idx2word: List[str]
    style: str  # "bytes", "enwik8" (decimal byte values), "chars" (text8) or "words"

    def __len__(self) -> int:
        return len(self.idx2word)

    def decode(self, ids: Sequence[int]) -> str:
        words = [self.idx2word[i] for i in ids]
        if self.style == "bytes":
            return bytes(int(w) for w in words).decode("utf-8", errors="replace")
        if self.style == "enwik8":
            return bytes(10 if w == EOS else int(w) for w in words).decode("utf-8", errors="replace")
        if self.style == "chars":
            return "".join("\n" if w == EOS else (" " if w == "_" else w) for w in words)
        lines = " ".join(words).split(EOS)
        return "\n".join(line.strip() for line in lines)

    def words(self, text: str) -> List[str]:
        """The tokens of ``text`` in this vocabulary's style (some may be outside it)."""
        if self.style == "bytes":
            return [str(b) for b in text.encode("utf-8")]
        if self.style == "enwik8":
            return [EOS if b == 10 else str(b) for b in text.encode("utf-8")]
        if self.style == "chars":
            return [EOS if c == "\n" else ("_" if c == " " else c) for c in text]
        return [w for line in text.split("\n") for w in line.split() + [EOS]][:-1]

    def encode(self, text: str) -> List[int]:
        index = {w: i for i, w in enumerate(self.idx2word)}
        words = self.words(text)
        missing = sorted({w for w in words if w not in index})
        if missing:
            raise ConfigError(f"the prompt has tokens outside the vocabulary: {missing[:10]}")
        return [index[w] for w in words]


@dataclass
class Corpus:
    vocab: Vocab
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    fingerprint: Optional[dict] = None  # corpus_cache.fingerprint of the source files

    def split(self, name: str) -> np.ndarray:
        return getattr(self, name)


# ---- tokenising (tokenizer.py) and caching ------------------------------------------
def _style(idx2word: List[str]) -> str:
    if all(w == EOS or (w.isdigit() and int(w) < 256) for w in idx2word):
        return "enwik8"
    if all(w == EOS or len(w) == 1 for w in idx2word):
        return "chars"
    return "words"


def _sources(path: Path) -> Optional[Dict[str, Path]]:
    for pattern in ("{}.txt", "wiki.{}.tokens"):
        files = {name: path / pattern.format(name) for name in SPLITS}
        if all(f.is_file() for f in files.values()):
            return files
    return None


def source_files(path: Path) -> List[Path]:
    """The files the corpus at ``path`` is read from (``path`` checked by check_data_path)."""
    return list(_sources(path).values()) if path.is_dir() else [path]


def check_split(split: Sequence[float]) -> None:
    """Three positive fractions that sum to 1: train, valid, test of a plain text file."""
    SPLIT.check("--data-split", split)


def split_sizes(n: int, split: Sequence[float]) -> Tuple[int, int, int]:
    """Tokens of train, valid and test: floor(n * f) for the first two, the test the rest
    (the third fraction, up to the rounding of the other two)."""
    check_split(split)
    n_train, n_valid = int(n * split[0]), int(n * split[1])
    return n_train, n_valid, n - n_train - n_valid


def compact_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32


# split name -> (number of tokens, a function giving the tokens again piece by piece)
Pieces = Dict[str, Tuple[int, Callable[[], Iterator[np.ndarray]]]]


def _tokenised(files: Dict[str, Path], sort_by_freq: bool, entry) -> Tuple[Vocab, Pieces, list]:
    """Tokenise a folder's splits into raw id files beside the entry (memory without one);
    the vocabulary, the ids renumbered on the way out, and the sinks (to delete)."""
    sinks = {name: IdSink(entry.temp(name + ".ids") if entry else None) for name in SPLITS}
    idx2word = tokenize_into(files, sinks)
    remap = None
    if sort_by_freq:
        remap = frequency_remap(sinks["train"].counts, len(idx2word))
        idx2word = [idx2word[i] for i in np.argsort(remap)]
    pieces = {name: (sink.n, lambda sink=sink: (p if remap is None else remap[p] for p in sink.pieces()))
              for name, sink in sinks.items()}
    return Vocab(idx2word, _style(idx2word)), pieces, list(sinks.values())


def _file_pieces(path: Path, start: int, stop: int) -> Iterator[np.ndarray]:
    """Bytes ``start:stop`` of the file, COPY_BYTES at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        while start < stop:
            piece = np.frombuffer(f.read(min(COPY_BYTES, stop - start)), dtype=np.uint8)
            start += piece.size
            yield piece


def _byte_splits(path: Path, split: Sequence[float]) -> Tuple[Vocab, Pieces]:
    """A plain file's bytes, cut into train, valid and test by ``split``."""
    sizes = split_sizes(path.stat().st_size, split)
    bounds = np.cumsum((0,) + sizes).tolist()
    pieces = {name: (n, lambda a=a, b=b: _file_pieces(path, a, b))
              for name, n, a, b in zip(SPLITS, sizes, bounds, bounds[1:])}
    return Vocab([str(b) for b in range(256)], "bytes"), pieces


def _build(path: Path, cfg: DataConfig, folder: Path) -> Corpus:
    """Tokenise into the cache entry ``folder``, streamed: the working memory is a few
    pieces, never a whole file or split; the arrays are then memory mapped from the entry.
    Where the folder cannot be written, the corpus is built in memory instead."""
    entry = corpus_cache.Entry.open(folder)
    files = _sources(path) if path.is_dir() else None
    sinks = []
    try:
        if files is not None:
            vocab, pieces, sinks = _tokenised(files, cfg.sort_by_freq, entry)
        else:
            vocab, pieces = _byte_splits(path, cfg.split)
        dtype = compact_dtype(len(vocab))
        if entry is None:
            arrays = {name: np.concatenate([np.asarray(p, dtype=dtype) for p in make()] or [np.zeros(0, dtype)])
                      for name, (n, make) in pieces.items()}
            return Corpus(vocab, **arrays)
        for name, (n, make) in pieces.items():
            entry.write_array(name, dtype, n, make())
        entry.commit({"vocab": vocab.idx2word, "style": vocab.style, "source": str(path.resolve())})
    finally:
        for sink in sinks:
            sink.close()
        if entry is not None:
            entry.discard()
    meta, arrays = corpus_cache.load_cached(folder, SPLITS)
    return Corpus(vocab, **arrays)


def trained_token_ids(corpus: Corpus) -> Optional[List[int]]:
    """The ids that occur in the training split, for a vocabulary of all 256 bytes (a text
    file): what a checkpoint keeps as ``vocab['seen']`` so that generation can name the
    prompt bytes the model never saw. None for the other vocabularies, built from the text."""
    if corpus.vocab.style != "bytes":
        return None
    counts = np.bincount(corpus.train, minlength=len(corpus.vocab))  # (V,)
    return np.flatnonzero(counts).tolist()


def check_data_path(cfg: DataConfig) -> Path:
    path = Path(cfg.path)
    if not path.exists():
        known = [name for name in DATASETS if name in path.name]
        dataset = known[0] if len(known) == 1 else "{" + "|".join(DATASETS) + "}"
        raise ConfigError(f"--data {cfg.path}: no such file or folder. Prepare a dataset into it with "
                          f"`bash scripts/get_data.sh {dataset} {cfg.path}`, or give any text file")
    if path.is_dir() and _sources(path) is None:
        raise ConfigError(f"--data {cfg.path}: the folder has neither train.txt/valid.txt/test.txt nor "
                          "wiki.{train,valid,test}.tokens; prepare it with scripts/get_data.sh")
    if path.is_file() and path.stat().st_size < 100:
        raise ConfigError(f"--data {cfg.path}: the file is too small to train on")
    return path


def data_fingerprint(cfg: DataConfig) -> dict:
    """Size and sha256 of the data at ``cfg.path`` (computed once per process)."""
    return corpus_cache.fingerprint(source_files(check_data_path(cfg)))


def load_corpus(cfg: DataConfig) -> Corpus:
    """Tokenise (or load the cached tokenisation of) the data at ``cfg.path``."""
    path = check_data_path(cfg)
    fp = data_fingerprint(cfg)
    settings = [cfg.sort_by_freq, list(cfg.split) if path.is_file() else None]
    folder = corpus_cache.cache_folder(path, fp, settings, cfg.cache_dir)
    cached = corpus_cache.load_cached(folder, SPLITS)
    if cached is not None:
        meta, arrays = cached
        corpus = Corpus(Vocab(meta["vocab"], meta["style"]), **arrays)
    else:
        corpus = _build(path, cfg, folder)
    corpus.fingerprint = fp
    if min(len(corpus.split(name)) for name in SPLITS) < 2:
        raise ConfigError(f"--data {cfg.path}: a split has fewer than 2 tokens")
    return corpus


# ---- streams ------------------------------------------------------------------
def batchify(ids: np.ndarray, nrows: int) -> np.ndarray:
    """Cut into ``nrows`` contiguous rows (the tail that does not fill a row is dropped)."""
    ncols = len(ids) // nrows
    return ids[: nrows * ncols].reshape(nrows, ncols)  # (B, n)


class Stream:
    """Blocks of M columns from rows of a split; wraps to a seeded random offset in [0, M)."""

    def __init__(self, rows: np.ndarray, block: int, seed: int):
        if rows.shape[1] <= block + 1:
            raise ConfigError(f"a split has {rows.shape[1]} tokens per row, too few for --block-sz {block}; "
                              "use a smaller --batch-sz or --block-sz")
        self.rows = rows  # (B, n)
        self.block = block
        self.pos = 0
        self.rng = random.Random(seed)

    def next_block(self) -> Tuple[torch.Tensor, torch.Tensor]:
        chunk = np.asarray(self.rows[:, self.pos: self.pos + self.block + 1], dtype=np.int64)  # (B, M+1)
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1], chunk[:, 1:]  # (B, M), (B, M)

    def advance(self) -> bool:
        """Move one block on; True when the stream wrapped (the caller zeroes its caches)."""
        self.pos += self.block
        if self.pos >= self.rows.shape[1] - self.block:
            self.pos = self.rng.randrange(self.block)
            return True
        return False

    def state_dict(self) -> dict:
        return {"pos": self.pos, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def eval_rows(ids: np.ndarray, nrows: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose targets partition tokens 1..T-1 (every token but the first is scored).

    Row r predicts targets [s_r, e_r) from inputs [s_r - 1, e_r - 1); shorter rows are
    padded at the end with masked positions. Returns inputs, targets, mask, each (B, n).
    """
    n_targets = len(ids) - 1
    sizes = [n_targets // nrows + (r < n_targets % nrows) for r in range(nrows)]
    width = max(sizes)
    inputs = np.zeros((nrows, width), dtype=np.int64)  # (B, n)
    targets = np.zeros((nrows, width), dtype=np.int64)  # (B, n)
    mask = np.zeros((nrows, width), dtype=bool)  # (B, n)
    start = 1
    for r, size in enumerate(sizes):
        inputs[r, :size] = ids[start - 1: start - 1 + size]
        targets[r, :size] = ids[start: start + size]
        mask[r, :size] = True
        start += size
    return inputs, targets, mask
