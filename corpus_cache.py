"""Fingerprints of the data and the cache of tokenised corpora.

A fingerprint is ``{"size": bytes, "sha256": hex}`` over the source files (one plain
file, or the three split files of a folder in train/valid/test order, each preceded by
its name and size). It is computed from the content once per process (sha256 reads
about 0.6 GB/s on one core, so 0.16 s for 100 MB) and stored in checkpoints, so that
a run cannot resume or be evaluated on other data without a word.

The tokenised splits are cached as ``.npy`` arrays (written piece by piece, memory
mapped when read) and a ``meta.json`` in ``CACHE_ROOT/<name>-<key>/``, where the key hashes the data's
resolved path, its fingerprint and the tokenisation settings: a file rewritten with
the same size and time gets a new key. ``CACHE_ROOT`` is ``--cache-dir``, else
``$ADAPTIVE_SPAN_CACHE``, else ``$XDG_CACHE_HOME/adaptive-span``, else
``~/.cache/adaptive-span``; the data folder itself is never written unless it is given
as the cache folder.
"""
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

CACHE_VERSION = 3
READ_BYTES = 1 << 24
_memo: Dict[tuple, dict] = {}  # stat signature of the files -> fingerprint, for this process


def _signature(files: Sequence[Path]) -> tuple:
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


def fingerprint(files: Sequence[Path]) -> dict:
    """Total size and sha256 of the files' contents (names and sizes included)."""
    files = [Path(f) for f in files]
    key = _signature(files)
    if key in _memo:
        return _memo[key]
    digest, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        if len(files) > 1:
            digest.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as handle:
            while True:
                block = handle.read(READ_BYTES)
                if not block:
                    break
                digest.update(block)
    _memo[key] = {"size": total, "sha256": digest.hexdigest()}
    return _memo[key]


def describe(fp: dict) -> str:
    return f"{fp['size']:,} bytes, sha256 {fp['sha256'][:12]}"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("ADAPTIVE_SPAN_CACHE"):
        return Path(os.environ["ADAPTIVE_SPAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adaptive-span"


def cache_folder(path: Path, fp: dict, settings: list, cache_dir: Optional[str] = None) -> Path:
    """The folder of the cached tokenisation of ``path`` with these settings and content."""
    key = hashlib.sha1(json.dumps([CACHE_VERSION, str(path.resolve()), fp, settings]).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name)[:40] or "data"
    return cache_root(cache_dir) / f"{name}-{key[:16]}"


def load_cached(folder: Path, splits: Sequence[str]) -> Optional[Tuple[dict, Dict[str, np.ndarray]]]:
    """(meta, arrays) of a complete cache entry, or None."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in splits}
    except (OSError, ValueError):
        return None
    return meta, arrays


class Entry:
    """A cache entry being written by this process: arrays streamed into files with names of
    their own (several processes may build the same entry at once), renamed into place by
    ``commit``, meta.json last, which marks the entry complete."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.arrays: List[str] = []

    @classmethod
    def open(cls, folder: Path) -> Optional["Entry"]:
        """An entry in ``folder``, or None when the folder cannot be written."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.touch()
            probe.unlink()
        except OSError:
            return None
        return cls(folder)

    def temp(self, name: str) -> Path:
        return self.folder / f"{name}.{self.tag}.tmp"

    def write_array(self, name: str, dtype, n: int, pieces: Iterable[np.ndarray]) -> None:
        """``name.npy``: a 1-d array of ``n`` values of ``dtype``, written piece by piece."""
        dtype = np.dtype(dtype)
        with open(self.temp(name + ".npy"), "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
            written = 0
            for piece in pieces:
                f.write(memoryview(np.ascontiguousarray(piece, dtype=dtype)).cast("B"))
                written += len(piece)
        if written != n:
            raise RuntimeError(f"{name}: {written} values written, {n} announced")
        self.arrays.append(name)

    def commit(self, meta: dict) -> None:
        for name in self.arrays:
            os.replace(self.temp(name + ".npy"), self.folder / f"{name}.npy")
        tmp = self.temp("meta.json")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.folder / "meta.json")

    def discard(self) -> None:
        """Remove what this entry left unfinished (its temporary files)."""
        for path in self.folder.glob(f"*.{self.tag}.tmp"):
            path.unlink(missing_ok=True)
