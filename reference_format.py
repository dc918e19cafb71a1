"""The reference implementation's on-disk token formats (docs/data.md), written once for
scripts/prepare_data.py, the planted corpus and the benchmarks' generated corpora:

- enwik8: every byte as its decimal value, one space between tokens, a newline byte written
  as a real line break;
- text8: every character, '_' for a space, one space between characters, one line.

Vectorised over numpy byte arrays; ``write_tokens`` streams a whole split in chunks.
"""
from pathlib import Path
from typing import Callable, Optional

import numpy as np

CHUNK = 1 << 22  # bytes converted per step (bounds memory to ~16x this)
KINDS = ("enwik8", "text8")


def _byte_table():
    """Row v holds the text of byte v followed by its separator; ``keep`` marks used cells."""
    table = np.zeros((256, 4), dtype=np.uint8)  # (256, 4)
    lengths = np.zeros(256, dtype=np.int64)  # (256,)
    for value in range(256):
        entry = (b"\n" if value == 10 else str(value).encode()) + b" "
        table[value, : len(entry)] = np.frombuffer(entry, dtype=np.uint8)
        lengths[value] = len(entry)
    return table, np.arange(4)[None, :] < lengths[:, None]  # (256, 4), (256, 4)


_TABLE, _KEEP = _byte_table()


def tokens_text(chunk: np.ndarray, kind: str) -> bytes:
    """Every token of the bytes ``chunk`` (n,) in ``kind``'s format, each followed by one space."""
    if kind == "enwik8":
        return _TABLE[chunk][_KEEP[chunk]].tobytes()  # (sum of token lengths,)
    out = np.full(2 * len(chunk), ord(" "), dtype=np.uint8)  # (2n,)
    out[0::2] = np.where(chunk == ord(" "), ord("_"), chunk)  # (n,)
    return out.tobytes()


def formatted(part: np.ndarray, kind: str) -> bytes:
    """The whole of ``part`` in ``kind``'s format, with no separator after the last token."""
    return tokens_text(part, kind)[:-1]


def write_tokens(part: np.ndarray, path: Path, kind: str,
                 on_chunk: Optional[Callable[[int], None]] = None) -> None:
    """Write ``part`` to ``path`` in ``kind``'s format, CHUNK bytes at a time (``on_chunk(n)``
    after each, e.g. a progress bar)."""
    with open(path, "wb") as f:
        for start in range(0, len(part), CHUNK):
            chunk = part[start : start + CHUNK]  # (<= CHUNK,)
            text = tokens_text(chunk, kind)
            f.write(text[:-1] if start + CHUNK >= len(part) else text)
            if on_chunk is not None:
                on_chunk(len(chunk))
