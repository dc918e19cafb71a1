"""A long-range corpus: text with copies of earlier passages planted at known distances.

A test of the span mechanism on real text, not a natural-text benchmark: a head can only
predict a planted copy from its source if its span reaches back the copy's distance.

Planting (``plant``), per split, from the split's own bytes: ordinary text is taken in
order from the source; between ordinary stretches a copy is inserted: ``length`` tokens
(uniform in [min_len, max_len]) that repeat the output ``distance`` tokens earlier, with
the distance log-uniform over [min_distance, max_distance] (a copy whose distance would
reach before the split's start is not planted). Gaps between copies are exponential with
the mean that makes ``fraction`` of the output tokens copies. A copy longer than its
distance repeats itself (out[q] = out[q - d] token by token, like LZ77).

The side file ``copies.json`` lists, per split, the copies as runs ``[start, length,
distance]`` in token positions of the prepared stream (token i = byte i of the split's
``.txt.raw``; the stream's final ``<eos>`` added by the reader is never a copy):
every position q in [start, start + length) holds the token at q - distance.
"""
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from reference_format import write_tokens
from utils import ConfigError

SIDE_FILE = "copies.json"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PlantConfig:
    min_distance: int = 64
    max_distance: int = 4096
    min_len: int = 32
    max_len: int = 128
    fraction: float = 0.2  # of the output tokens that are copies
    seed: int = 1

    def check(self) -> None:
        """One ``error:``-ready message naming the flag, for impossible settings."""
        if self.min_distance < 1:
            raise ConfigError(f"--min-distance {self.min_distance}: give a distance of at least 1")
        if self.max_distance < self.min_distance:
            raise ConfigError(f"--max-distance {self.max_distance} is below --min-distance "
                              f"{self.min_distance}; give D >= {self.min_distance}")
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(f"--copy-len {self.min_len} {self.max_len}: give 1 <= MIN <= MAX")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"--copy-fraction {self.fraction:g}: give a fraction in (0, 1), e.g. 0.2")


def draw_distance(rng: random.Random, cfg: PlantConfig) -> int:
    """log-uniform over [min_distance, max_distance], rounded down, ends included."""
    lo, hi = math.log(cfg.min_distance), math.log(cfg.max_distance + 1)
    return min(cfg.max_distance, int(math.exp(rng.uniform(lo, hi))))


def plant(src: np.ndarray, cfg: PlantConfig, rng: random.Random) -> Tuple[np.ndarray, List[List[int]]]:
    """The planted stream of ``src`` (uint8, all of it used in order) and its copy runs."""
    mean_len = (cfg.min_len + cfg.max_len) / 2
    mean_gap = mean_len * (1 - cfg.fraction) / cfg.fraction
    total_cap = int(len(src) / (1 - cfg.fraction)) + 2 * cfg.max_len + 16
    out = np.empty(total_cap, dtype=np.uint8)  # (T_cap,) grown in place
    runs: List[List[int]] = []
    n, used = 0, 0
    while used < len(src):
        gap = max(1, int(round(rng.expovariate(1.0 / mean_gap))))
        take = src[used: used + gap]  # (<= gap,)
        if n + len(take) + cfg.max_len > len(out):
            out = np.concatenate([out, np.empty(len(out) // 2 + cfg.max_len, dtype=np.uint8)])
        out[n: n + len(take)] = take
        n, used = n + len(take), used + len(take)
        if used >= len(src):
            break  # the split ends with ordinary text
        length, distance = rng.randint(cfg.min_len, cfg.max_len), draw_distance(rng, cfg)
        if distance > n:
            continue  # its source would lie before the split's start
        for i in range(0, length, distance):  # chunks of at most d: each reads finished tokens
            size = min(distance, length - i)
            out[n + i: n + i + size] = out[n + i - distance: n + i - distance + size]
        runs.append([n, length, distance])
        n += length
    return out[:n].copy(), runs


def copy_distances(runs: List[List[int]], n: int) -> np.ndarray:
    """Per token position of a stream of ``n`` tokens: the copy distance, 0 for ordinary text."""
    dist = np.zeros(n, dtype=np.int64)  # (T,)
    for start, length, distance in runs:
        if start < 0 or start + length > n or distance < 1 or distance > start:
            raise ConfigError(f"{SIDE_FILE}: the run {[start, length, distance]} does not fit a "
                              f"stream of {n} tokens; make the corpus again with scripts/plant_repeats.py")
        dist[start: start + length] = distance
    return dist


# ---- the prepared folder --------------------------------------------------------
def write_folder(splits: Dict[str, np.ndarray], runs: Dict[str, List[List[int]]], out: Path,
                 info: dict) -> None:
    """``{split}.txt`` (enwik8 format), ``{split}.txt.raw``, the side file and the marker."""
    for name in SPLITS:
        write_tokens(splits[name], out / f"{name}.txt", "enwik8")
        (out / f"{name}.txt.raw").write_bytes(splits[name].tobytes())
    side = {"format": FORMAT_VERSION, "fields": ["start", "length", "distance"],
            "tokens": {name: int(len(splits[name])) for name in SPLITS}, **runs}
    (out / SIDE_FILE).write_text(json.dumps(side, separators=(",", ":")) + "\n")
    (out / ".prepared.json").write_text(json.dumps(info, indent=1) + "\n")


def plant_splits(data: bytes, test_size: int, cfg: PlantConfig) -> Tuple[Dict[str, np.ndarray], Dict[str, list]]:
    """Split like prepare_data (valid and test of ``test_size`` bytes from the end), then
    plant into each split with its own generator (seeded from ``cfg.seed`` and the split)."""
    cfg.check()
    if test_size <= 0 or 2 * test_size >= len(data):
        raise ConfigError(f"--test-size {test_size} does not fit a text of {len(data):,} bytes "
                          f"(need 0 < 2 x test-size < size)")
    array = np.frombuffer(data, dtype=np.uint8)  # (T,)
    bounds = {"train": (0, len(data) - 2 * test_size), "valid": (len(data) - 2 * test_size, len(data) - test_size),
              "test": (len(data) - test_size, len(data))}
    splits, runs = {}, {}
    for i, name in enumerate(SPLITS):
        lo, hi = bounds[name]
        splits[name], runs[name] = plant(array[lo:hi], cfg, random.Random(cfg.seed * 1000 + i))
    return splits, runs


def marker_info(source: Path, data: bytes, test_size: int, cfg: PlantConfig) -> dict:
    return {"dataset": "planted", "source": str(source.resolve()), "test_size": test_size,
            "source_bytes": len(data), "source_sha256": hashlib.sha256(data).hexdigest(),
            "plant": asdict(cfg)}


def read_side_file(folder: Path) -> dict:
    """The side file of a planted folder: ``tokens`` and the runs of every split."""
    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; the data is not a planted corpus "
                          f"(make one with scripts/plant_repeats.py)")
    side = json.loads(path.read_text())
    if side.get("format") != FORMAT_VERSION or any(name not in side for name in SPLITS):
        raise ConfigError(f"{path}: not a side file of format {FORMAT_VERSION}; make the corpus again "
                          f"with scripts/plant_repeats.py")
    return side
