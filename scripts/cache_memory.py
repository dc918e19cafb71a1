"""Peak memory of building the token cache (what a first run on a dataset does before it
trains), as a user's run sees it: a fresh process, default allocator, no settings.

    python scripts/cache_memory.py --generate enwik8 --mb 100       # generated under /tmp, deleted after
    python scripts/cache_memory.py --generate words --mb 100        # WikiText-like words (unicode: Python path)
    python scripts/cache_memory.py --data data/enwik8 [--adapt-io]   # a real data set
    python scripts/cache_memory.py --data DIR --default-cache --json FILE   # build the cache main.py uses

A worker process imports data.py (and so torch, as main.py does), notes its resident size,
resets the kernel's peak (VmHWM, /proc/self/clear_refs), calls ``load_corpus`` into an empty
cache folder (a temporary one unless --default-cache) and reports:
  build peak   = peak resident size during the build - resident size before it,
  process peak = the worker's whole-process peak (ru_maxrss: interpreter, torch and the build),
  cache        = bytes of the finished cache (.npy files),
and the bound the project keeps: build peak <= cache + 256 MB (BOUND_MB).

Generated corpora (--generate KIND --mb N: N MB of source text, split 90/5/5 like enwik8):
  bytes   a plain text file (byte level);
  enwik8  a reference-format folder: every byte as its decimal value (about 3.7 bytes per byte);
  text8   a reference-format folder: one line, every character then a space (2 bytes per character);
  words   a WikiText-style folder: word lines with unicode words (Python's str.split path).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reference_format import formatted  # noqa: E402  (numpy only: the measured imports stay in worker)

BOUND_MB = 256  # working buffer allowed on top of the finished cache (issue 19)
KINDS = ("bytes", "enwik8", "text8", "words")
UNICODE = ["café", "naïve", "—", "€5", "日本", "Straße", "😀"]


# ---- generated corpora -------------------------------------------------------------------
def _vocabulary(rng, size: int, lowercase_only: bool) -> list:
    syllables = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"] + ["th", "st", "er", "an", "ing"]
    words = {"".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(size * 2)}
    words = sorted(words)[:size]
    return words if lowercase_only else words + UNICODE + [",", ".", "@-@", "="]


def _word_blocks(nbytes: int, seed: int, lowercase_only: bool = False):
    """English-like text in blocks of about 1 MB: Zipf-distributed words, a line break
    every 8 to 24 words (none with ``lowercase_only``: text8's one line), every word of
    the vocabulary in the first block (so that valid and test use train's words)."""
    rng = np.random.default_rng(seed)
    words = _vocabulary(rng, 20000, lowercase_only)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    first, written = True, 0
    while written < nbytes:
        picks = [words[i] for i in rng.choice(len(words), 150_000, p=p)]
        if first:
            picks, first = words + picks, False
        if not lowercase_only:
            for k in np.cumsum(rng.integers(8, 25, len(picks) // 8)):
                if k < len(picks):
                    picks[k] += "\n"
        block = (" ".join(picks) + " ").encode()
        written += len(block)
        yield block


def _generated_bytes(nbytes: int, seed: int, lowercase_only: bool = False) -> bytes:
    return b"".join(_word_blocks(nbytes, seed, lowercase_only))[:nbytes]


def _reference_format(kind: str):
    """Bytes -> the reference format of ``kind`` (reference_format.py); text8 stripped first."""
    def fmt(part: bytes) -> bytes:
        return formatted(np.frombuffer(part.strip() if kind == "text8" else part, dtype=np.uint8), kind)
    return fmt


def generate(kind: str, mb: float, folder: Path) -> Path:
    """``mb`` MB of source text of ``kind`` under ``folder``; the path to give --data."""
    n = int(mb * 1e6)
    data = _generated_bytes(n, seed=0, lowercase_only=kind == "text8")
    if kind == "bytes":
        path = folder / "text.txt"
        path.write_bytes(data)
        return path
    cuts = {"train": (0, n - n // 10), "valid": (n - n // 10, n - n // 20), "test": (n - n // 20, n)}
    fmt = _reference_format(kind) if kind in ("enwik8", "text8") else (lambda b: b)
    for name, (a, b) in cuts.items():
        part = data[a:b]
        if kind == "words":  # whole lines: valid and test start after a line break, all end with one
            part = part[part.find(b"\n") + 1 if name != "train" else 0: part.rfind(b"\n") + 1]
        with open(folder / f"{name}.txt", "wb") as f:
            for i in range(0, len(part), 1 << 22):
                f.write(fmt(part[i:i + (1 << 22)]) + (b" " if kind != "words" and i + (1 << 22) < len(part) else b""))
    del data
    return folder


# ---- the measurement ------------------------------------------------------------------
def worker(spec: dict) -> dict:
    """In a fresh process: build the cache of spec['data'] and measure (module docstring)."""
    sys.path.insert(0, str(ROOT))
    from data import DataConfig, load_corpus
    from measure import peak_rss_bytes, process_peak_rss_bytes, reset_peak_rss
    cfg = DataConfig(spec["data"], sort_by_freq=spec["adapt_io"], cache_dir=spec["cache_dir"])
    entries = set(Path(spec["cache_dir"]).glob("*/meta.json"))
    before = reset_peak_rss(trim=False)
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    cache = sum(getattr(corpus.split(n), "nbytes", 0) for n in ("train", "valid", "test"))
    return {"rss_before_mb": before / 2**20, "build_peak_mb": (peak - before) / 2**20,
            "process_peak_mb": process_peak_rss_bytes() / 2**20, "cache_mb": cache / 2**20,
            "seconds": seconds, "tokens": sum(len(corpus.split(n)) for n in ("train", "valid", "test")),
            "vocab": len(corpus.vocab), "built": set(Path(spec["cache_dir"]).glob("*/meta.json")) != entries}


def measure(data: str, adapt_io: bool = False, cache_dir: str = None) -> dict:
    """Build the cache of ``data`` in a fresh process (into ``cache_dir``, else a temporary
    folder that is deleted); the figures, with the source size and the bound."""
    tmp = None if cache_dir else tempfile.mkdtemp(prefix="cache-memory-")
    spec = {"data": str(data), "adapt_io": adapt_io, "cache_dir": cache_dir or tmp}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env=env)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the cache build failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    path = Path(data)
    files = [p for p in path.iterdir() if p.suffix in (".txt", ".tokens")] if path.is_dir() else [path]
    out["source_mb"] = sum(p.stat().st_size for p in files) / 2**20
    out["bound_mb"] = out["cache_mb"] + BOUND_MB
    out["within_bound"] = out["build_peak_mb"] <= out["bound_mb"]
    return out


def summary(r: dict) -> str:
    return (f"source {r['source_mb']:.0f} MB, {r['tokens']:,} tokens, vocabulary {r['vocab']:,}: cache "
            f"{r['cache_mb']:.0f} MB built in {r['seconds']:.1f} s; build peak {r['build_peak_mb']:.0f} MB over "
            f"{r['rss_before_mb']:.0f} MB before (bound cache + {BOUND_MB} = {r['bound_mb']:.0f} MB: "
            f"{'within' if r['within_bound'] else 'EXCEEDED'}); whole-process peak {r['process_peak_mb']:.0f} MB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a data set as main.py takes it (--data)")
    p.add_argument("--generate", choices=KINDS, help="generate a corpus of this kind under $TMPDIR instead")
    p.add_argument("--mb", type=float, default=100.0, help="with --generate: MB of source text")
    p.add_argument("--adapt-io", action="store_true", help="the vocabulary sorted by frequency (as --adapt-io)")
    p.add_argument("--default-cache", action="store_true",
                   help="build into the cache main.py uses (kept); else a temporary folder, deleted")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if bool(args.data) == bool(args.generate):
        print("error: give either --data PATH or --generate KIND", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix=f"cache-memory-{args.generate}-") if args.generate else None
    try:
        data = generate(args.generate, args.mb, Path(folder)) if folder else args.data
        cache_dir = None
        if args.default_cache:
            sys.path.insert(0, str(ROOT))
            import corpus_cache
            cache_dir = str(corpus_cache.cache_root())
        result = {"data": args.generate or args.data, **measure(str(data), args.adapt_io, cache_dir)}
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"token cache build ({result['data']}): "
          f"{summary(result) if result['built'] else 'already cached, nothing built'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
