"""Corpora and token streams.

Formats read by ``load_corpus``:
- a reference-format folder ``DIR/{train,valid,test}.txt`` (what ``scripts/get_data.sh``
  prepares): every line is ``line.split()`` followed by ``<eos>``, the vocabulary
  comes from train in order of first appearance (by training frequency with
  ``--adapt-io``; ties in reverse order of first appearance, as the reference);
- a WikiText folder ``DIR/wiki.{train,valid,test}.tokens``: the same rules;
- any other file: raw bytes (vocabulary of 256), split 90/5/5 by default.

The tokenised splits are cached in a cache folder keyed by the data's path and content
(corpus_cache.py); ``Corpus.fingerprint`` is the data's size and sha256.
"""
import math
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import corpus_cache
from utils import ConfigError

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
DATASETS = ("enwik8", "text8", "wikitext-103")  # what scripts/get_data.sh prepares
CHUNK_BYTES = 1 << 25  # tokenise in pieces of 32 MB


@dataclass
class DataConfig:
    path: str
    sort_by_freq: bool = False
    split: Tuple[float, float, float] = (0.9, 0.05, 0.05)  # for raw text files
    cache_dir: Optional[str] = None  # default: corpus_cache.cache_root()


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


# ---- tokenising ----------------------------------------------------------------
class _NotFast(Exception):
    """The text needs Python's ``str.split`` (unicode, long tokens, odd whitespace)."""


def _chunks(path: Path, size: int = CHUNK_BYTES):
    """The file's bytes in pieces that end after a newline (the last piece may not)."""
    total = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=total, unit="B", unit_scale=True, leave=False,
                                     desc=f"tokenising {path.name}", disable=True if total < size else None) as bar:
        rest = b""
        while True:
            block = f.read(size)
            if not block:
                break
            bar.update(len(block))
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                yield block[:cut]
        if rest:
            yield rest + b"\n"  # the last line gets its <eos> too


def _byte_classes() -> np.ndarray:
    """0: whitespace, 1: token byte, 2: newline, 3: needs Python (unicode, CR, NUL, separators)."""
    table = np.ones(256, dtype=np.uint8)
    table[[32, 9, 11, 12]] = 0
    table[10] = 2
    table[[0, 13, 0x1C, 0x1D, 0x1E, 0x1F]] = 3
    table[0x80:] = 3
    return table


_CLASSES = _byte_classes()


def _chunk_keys(raw: bytes) -> np.ndarray:
    """Keys of the tokens of whole lines: bytes packed little-endian, 0 for end of line."""
    a = np.frombuffer(raw, dtype=np.uint8)
    cls = _CLASSES[a]
    if cls.max(initial=0) == 3:
        raise _NotFast
    is_tok = cls == 1
    edges = np.diff(is_tok.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    if lengths.size and lengths.max() > 3:
        raise _NotFast
    words = a[starts].astype(np.uint32)
    for j in (1, 2):
        longer = lengths > j
        words[longer] |= a[starts[longer] + j].astype(np.uint32) << np.uint32(8 * j)
    is_start = cls == 2
    is_start[starts] = True
    order = np.flatnonzero(is_start)  # every token start and every newline, in text order
    keys = np.zeros(order.size, dtype=np.uint32)
    keys[cls[order] == 1] = words
    return keys


def _word_of(key: int) -> str:
    return EOS if key == 0 else key.to_bytes(4, "little").rstrip(b"\0").decode("ascii")


class _KeyVocab:
    """Ids of packed short tokens through a direct lookup table, in order of first appearance."""

    def __init__(self):
        self.table = np.full(1 << 24, -1, dtype=np.int32)
        self.keys: List[int] = []

    def ids(self, keys: np.ndarray, grow: bool, path: Path) -> np.ndarray:
        ids = self.table[keys]
        unseen = ids < 0
        if unseen.any():
            if not grow:
                raise ConfigError(f"{path}: token {_word_of(int(keys[np.argmax(unseen)]))!r} does not occur "
                                  "in the training split, so it has no id; the vocabulary comes from train")
            first = np.full(self.table.size, keys.size, dtype=np.int64)
            np.minimum.at(first, keys[unseen], np.flatnonzero(unseen))  # first index of each new key
            new = np.flatnonzero(first < keys.size)
            for key in new[np.argsort(first[new])].tolist():
                self.table[key] = len(self.keys)
                self.keys.append(key)
            ids = self.table[keys]
        return ids


def _fast_ids(paths: Dict[str, Path]) -> Tuple[List[str], Dict[str, np.ndarray]]:
    vocab = _KeyVocab()
    ids = {}
    for name in SPLITS:
        parts = [vocab.ids(_chunk_keys(raw), name == "train", paths[name]) for raw in _chunks(paths[name])]
        ids[name] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return [_word_of(k) for k in vocab.keys], ids


def _python_ids(path: Path, index: Dict[str, int], grow: bool) -> np.ndarray:
    """``line.split() + ['<eos>']`` per line, with Python (for unicode or long tokens)."""
    ids = array("i")
    total = path.stat().st_size
    with open(path, encoding="utf-8", errors="surrogateescape") as f, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {path.name}", leave=False,
                 disable=True if total < CHUNK_BYTES else None) as bar:
        for n, line in enumerate(f):
            if n % 65536 == 0:
                bar.n = f.buffer.tell() if hasattr(f, "buffer") else bar.n
                bar.refresh()
            words = line.split()
            words.append(EOS)
            if grow:
                ids.extend([index.setdefault(w, len(index)) for w in words])
                continue
            try:
                ids.extend([index[w] for w in words])
            except KeyError as err:
                raise ConfigError(f"{path}: token {err.args[0]!r} does not occur in the training split, "
                                  "so it has no id; the vocabulary comes from train") from None
    return np.frombuffer(ids, dtype=np.int32)


def tokenize_splits(paths: Dict[str, Path]) -> Tuple[List[str], Dict[str, np.ndarray]]:
    """Vocabulary in first-appearance order of train, and the ids of every split."""
    try:
        return _fast_ids(paths)
    except _NotFast:
        index: Dict[str, int] = {}
        ids = {name: _python_ids(paths[name], index, grow=name == "train") for name in SPLITS}
        return list(index), ids


def sort_by_frequency(idx2word: List[str], ids: Dict[str, np.ndarray]):
    """Most frequent first; equal counts in reverse order of first appearance (the reference's rule)."""
    counts = np.bincount(ids["train"], minlength=len(idx2word))
    order = np.argsort(counts, kind="stable")[::-1]  # new id -> old id
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)  # old id -> new id
    remap = remap.astype(np.int32)
    return [idx2word[i] for i in order], {name: remap[a] for name, a in ids.items()}


def _style(idx2word: List[str]) -> str:
    if all(w == EOS or (w.isdigit() and int(w) < 256) for w in idx2word):
        return "enwik8"
    if all(w == EOS or len(w) == 1 for w in idx2word):
        return "chars"
    return "words"


# ---- locating and caching ------------------------------------------------------------
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
    if len(split) != 3 or min(split) <= 0 or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        raise ConfigError(f"--data-split {' '.join(f'{x:g}' for x in split)}: give three positive "
                          "fractions (train, valid, test) that sum to 1, e.g. --data-split 0.9 0.05 0.05")


def split_sizes(n: int, split: Sequence[float]) -> Tuple[int, int, int]:
    """Tokens of train, valid and test: floor(n * f) for the first two, the test the rest
    (the third fraction, up to the rounding of the other two)."""
    check_split(split)
    n_train, n_valid = int(n * split[0]), int(n * split[1])
    return n_train, n_valid, n - n_train - n_valid


def _compact(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    dtype = np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32
    return np.ascontiguousarray(ids, dtype=dtype)


def _build(path: Path, cfg: DataConfig) -> Corpus:
    files = _sources(path) if path.is_dir() else None
    if files is not None:
        idx2word, ids = tokenize_splits(files)
        if cfg.sort_by_freq:
            idx2word, ids = sort_by_frequency(idx2word, ids)
        style = _style(idx2word)
    else:
        data = np.fromfile(path, dtype=np.uint8)
        n_train, n_valid, _ = split_sizes(len(data), cfg.split)
        ids = dict(zip(SPLITS, np.split(data, [n_train, n_train + n_valid])))
        idx2word, style = [str(b) for b in range(256)], "bytes"
    arrays = {name: _compact(a, len(idx2word)) for name, a in ids.items()}
    return Corpus(Vocab(idx2word, style), **arrays)


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
        corpus = _build(path, cfg)
        meta = {"vocab": corpus.vocab.idx2word, "style": corpus.vocab.style, "source": str(path.resolve())}
        corpus_cache.save_cached(folder, meta, {name: corpus.split(name) for name in SPLITS})
        # an unwritable cache folder is no error: the corpus is used from memory
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
