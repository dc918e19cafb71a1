"""Tokenising split files, streamed: ``line.split()`` followed by ``<eos>`` for every line,
the vocabulary in order of first appearance in train.

A file is read in pieces of CHUNK_BYTES (cut after a whitespace byte, so no token is cut;
a line may span pieces) and each piece's ids go to an ``IdSink``: a raw int32 file beside
the cache entry being written, or memory. Nothing holds a whole file, so the working
memory is a few pieces' worth plus the vocabulary (scripts/cache_memory.py measures it).
Two tokenisers give the same ids: a vectorised one for ASCII text whose tokens have at
most 3 bytes (enwik8, text8) and Python's ``str.split`` for anything else (unicode, long
words: WikiText); a file the first cannot take is tokenised again by the second.
"""
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from utils import ConfigError

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
CHUNK_BYTES = 1 << 22  # pieces of 4 MB (vectorised path); build peak: python scripts/cache_memory.py --generate enwik8
CHUNK_CHARS = 1 << 21  # pieces of 2M characters (Python path); python scripts/cache_memory.py --generate words
WHITESPACE = b" \t\n\x0b\x0c"  # the bytes a piece may end after (vectorised path)


class IdSink:
    """The int32 ids of one split, appended piece by piece to a raw file (or kept in memory
    when ``path`` is None), with the count of every id."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self.reset()

    def reset(self) -> None:
        self.n, self.parts, self.counts = 0, [], np.zeros(0, dtype=np.int64)
        self.file = open(self.path, "wb") if self.path is not None else None

    def write(self, ids) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if not ids.size:
            return
        if self.file is not None:
            self.file.write(memoryview(ids).cast("B"))
        else:
            self.parts.append(ids)
        self.n += ids.size
        counts = np.bincount(ids)
        if counts.size > self.counts.size:
            self.counts = np.pad(self.counts, (0, counts.size - self.counts.size))
        self.counts[: counts.size] += counts

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def pieces(self, size: int = 1 << 20) -> Iterator[np.ndarray]:
        """The ids again, in order, at most ``size`` at a time."""
        if self.path is None:
            yield from self.parts
            return
        self.close()
        with open(self.path, "rb") as f:
            while True:
                piece = np.fromfile(f, dtype=np.int32, count=size)
                if not piece.size:
                    return
                yield piece


def _progress(path: Path, size: int):
    total = path.stat().st_size
    return tqdm(total=total, unit="B", unit_scale=True, leave=False, desc=f"tokenising {path.name}",
                disable=True if total < 8 * size else None)


# ---- vectorised path (ASCII, tokens of at most 3 bytes) --------------------------------
class _NotFast(Exception):
    """The text needs Python's ``str.split`` (unicode, long tokens, odd whitespace)."""


def byte_pieces(path: Path, size: Optional[int] = None) -> Iterator[bytes]:
    """The file's bytes in pieces of about ``size`` (default CHUNK_BYTES) that end after a
    whitespace byte, a newline added at the end when the file does not end with one (its
    last line gets an <eos> too)."""
    size = size or CHUNK_BYTES
    with open(path, "rb") as f, _progress(path, size) as bar:
        rest, last = b"", b"\n"
        while True:
            block = f.read(size)
            if not block:
                break
            bar.update(len(block))
            last = block[-1:]
            block = rest + block
            cut = max(block.rfind(c) for c in WHITESPACE) + 1
            rest = block[cut:]
            if cut:
                yield block[:cut]
        if rest or last != b"\n":
            yield rest + b"\n"


def _byte_classes() -> np.ndarray:
    """0: whitespace, 1: token byte, 2: newline, 3: needs Python (unicode, CR, NUL, separators)."""
    table = np.ones(256, dtype=np.uint8)
    table[[32, 9, 11, 12]] = 0
    table[10] = 2
    table[[0, 13, 0x1C, 0x1D, 0x1E, 0x1F]] = 3
    table[0x80:] = 3
    return table


_CLASSES = _byte_classes()


def chunk_keys(raw: bytes) -> np.ndarray:
    """Keys of the tokens of a piece: bytes packed little-endian, 0 for end of line."""
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


def _unseen_error(path: Path, token: str) -> ConfigError:
    return ConfigError(f"{path}: token {token!r} does not occur in the training split, so it has no id; "
                       "the vocabulary comes from train")


class _KeyVocab:
    """Ids of packed short tokens through a direct lookup table (id + 1, 0: unseen), in
    order of first appearance. The table is allocated zeroed, so only the pages that
    hold a key become resident."""

    def __init__(self):
        self.table = np.zeros(1 << 24, dtype=np.int32)
        self.keys: List[int] = []

    def ids(self, keys: np.ndarray, grow: bool, path: Path) -> np.ndarray:
        ids = self.table[keys]
        unseen = ids == 0
        if unseen.any():
            if not grow:
                raise _unseen_error(path, _word_of(int(keys[np.argmax(unseen)])))
            new, first = np.unique(keys[unseen], return_index=True)
            for key in new[np.argsort(first)].tolist():  # in order of first appearance
                self.keys.append(key)
                self.table[key] = len(self.keys)
            ids = self.table[keys]
        return ids - 1


def _fast_ids(paths: Dict[str, Path], sinks: Dict[str, IdSink]) -> List[str]:
    vocab = _KeyVocab()
    for name in SPLITS:
        for raw in byte_pieces(paths[name]):
            sinks[name].write(vocab.ids(chunk_keys(raw), name == "train", paths[name]))
    return [_word_of(k) for k in vocab.keys]


# ---- Python path ------------------------------------------------------------------
def _lookup(words: List[str], index: Dict[str, int], grow: bool, path: Path) -> List[int]:
    if grow:
        return [index.setdefault(w, len(index)) for w in words]
    try:
        return [index[w] for w in words]
    except KeyError as err:
        raise _unseen_error(path, err.args[0]) from None


def python_ids(path: Path, index: Dict[str, int], grow: bool, sink: IdSink, size: Optional[int] = None) -> None:
    """``line.split() + ['<eos>']`` per line of the text file (universal newlines), read
    ``size`` (default CHUNK_CHARS) characters at a time; a word cut by a piece's end waits
    for the next piece."""
    size = size or CHUNK_CHARS
    with open(path, encoding="utf-8", errors="surrogateescape") as f, _progress(path, size) as bar:
        rest, open_line = "", False
        while True:
            text = f.read(size)
            if not text:
                break
            bar.update(len(text))
            lines = (rest + text).split("\n")
            last = lines.pop()  # the line that goes on in the next piece ("" after a newline)
            words = []
            for line in lines:
                words += line.split()
                words.append(EOS)
            tail = last.split()
            rest = tail.pop() if tail and not last[-1].isspace() else ""
            sink.write(_lookup(words + tail, index, grow, path))
            open_line = bool(last)
        if open_line:  # the last line has no newline: it gets its <eos> too
            sink.write(_lookup(([rest] if rest else []) + [EOS], index, grow, path))


# ---- both ---------------------------------------------------------------------------
def tokenize_into(paths: Dict[str, Path], sinks: Dict[str, IdSink]) -> List[str]:
    """Tokenise the three splits into ``sinks``; the vocabulary (first appearance in train)."""
    try:
        return _fast_ids(paths, sinks)
    except _NotFast:
        for sink in sinks.values():
            sink.close()
            sink.reset()
        index: Dict[str, int] = {}
        for name in SPLITS:
            python_ids(paths[name], index, name == "train", sinks[name])
        return list(index)


def tokenize_splits(paths: Dict[str, Path]) -> Tuple[List[str], Dict[str, np.ndarray]]:
    """Vocabulary in first-appearance order of train, and the ids of every split (in memory)."""
    sinks = {name: IdSink() for name in SPLITS}
    idx2word = tokenize_into(paths, sinks)
    return idx2word, {name: np.concatenate(list(s.pieces()) or [np.zeros(0, np.int32)]) for name, s in sinks.items()}


def frequency_remap(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Old id -> new id: most frequent first, equal counts in reverse order of first
    appearance (the reference's rule)."""
    counts = np.pad(counts, (0, vocab_size - counts.size))
    order = np.argsort(counts, kind="stable")[::-1]  # new id -> old id
    remap = np.empty(vocab_size, dtype=np.int32)
    remap[order] = np.arange(vocab_size, dtype=np.int32)
    return remap


def sort_by_frequency(idx2word: List[str], ids: Dict[str, np.ndarray]):
    """The vocabulary and ids renumbered by ``frequency_remap`` of the train counts."""
    remap = frequency_remap(np.bincount(ids["train"], minlength=len(idx2word)), len(idx2word))
    order = np.argsort(remap)
    return [idx2word[i] for i in order], {name: remap[a] for name, a in ids.items()}
