"""Which span settings let heads grow to the planted distances: a sweep over --adapt-span-init,
--adapt-span-ramp and --adapt-span-loss on a planted corpus (scripts/plant_repeats.py).

    python scripts/plant_repeats.py ../shared/data/enwik8-4M/enwik8.zip /tmp/planted
    OMP_NUM_THREADS=1 python scripts/span_sweep.py --data /tmp/planted --out /tmp/span_sweep

Every run is ``python main.py`` (one at a time, one thread) with the model below, trained
iteration by iteration (``--niter`` raised by one per call, resuming its checkpoint) so that
every head's span is read from the checkpoint after each iteration. Then each final model
is scored on the first --score-tokens tokens of the valid split (copy_score.py: bpc on
ordinary and copied positions apart, batch --score-rows). Everything goes under OUT
(OUT/<run>/model.pt, spans.jsonl, score.json, OUT/results.json); a second call reuses what
is done. The table is printed at the end.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint as ckpt_io  # noqa: E402
import copy_score  # noqa: E402
import planted  # noqa: E402
from data import DataConfig, load_corpus  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402

MAX_SPAN = 4096
MODEL = ["--nlayers", "4", "--hid-sz", "64", "--inner-hid-sz", "256", "--nheads", "4",
         "--attn-span", str(MAX_SPAN), "--block-sz", "64", "--batch-sz", "8", "--dropout", "0"]
TRAIN = ["--optim", "adagrad", "--lr", "0.07", "--momentum", "0", "--grad-clip", "0.03", "--lr-warmup", "30"]
# name: (--adapt-span-init, --adapt-span-ramp, --adapt-span-loss, iterations (0: --iters), --seed)
RUNS = {
    "init0": (0.0, 32, 0.0, 0, 1),
    "init0-loss": (0.0, 32, 2e-6, 0, 1),
    "init0-ramp256": (0.0, 256, 0.0, 0, 1),
    "init0.25": (0.25, 32, 0.0, 0, 1),
    "init0.5": (0.5, 32, 0.0, 0, 1),
    "init0.5-loss": (0.5, 32, 2e-6, 0, 1),
    "init1": (1.0, 32, 0.0, 0, 1),
    "init1-loss": (1.0, 32, 2e-6, 0, 1),
    "init0-1000": (0.0, 32, 0.0, 20, 1),  # the short start, trained longer
    "init0-s2": (0.0, 32, 0.0, 0, 2),  # second seeds
    "init0.5-s2": (0.5, 32, 0.0, 0, 2),
}


def run_flags(name: str) -> list:
    init, ramp, loss, _, seed = RUNS[name]
    return MODEL + TRAIN + ["--seed", str(seed), "--adapt-span", "--adapt-span-cache", "--adapt-span-init",
                            str(init), "--adapt-span-ramp", str(ramp), "--adapt-span-loss", str(loss)]


def head_spans(ckpt_path: Path) -> list:
    ckpt = ckpt_io.load_checkpoint(ckpt_path, log=lambda msg: None)
    model = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))
    ckpt_io.load_model_state(model, ckpt, ckpt_path)
    return model.head_spans()


def initial_spans(name: str) -> list:
    init, ramp = RUNS[name][:2]
    model = TransformerSeq(ModelConfig(vocab_size=8, hidden_size=64, inner_hidden_size=256, nlayers=4, nheads=4,
                                       attn_span=MAX_SPAN, adapt_span=True, adapt_span_init=init,
                                       adapt_span_ramp=ramp))
    return model.head_spans()


def train(name: str, args) -> None:
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "spans.jsonl"
    done = len(log_path.read_text().splitlines()) if log_path.exists() else 0
    if done == 0:
        log_path.write_text(json.dumps({"step": 0, "head_spans": initial_spans(name), "ms": None}) + "\n")
        done = 1
    for it in range(done, (RUNS[name][3] or args.iters) + 1):  # iteration it-1 runs; then its spans are read
        cmd = [sys.executable, str(ROOT / "main.py"), "--data", str(args.data), "--cache-dir", str(args.out / "cache"),
               "--checkpoint", str(folder / "model.pt"), "--nbatches", str(args.nbatches), "--niter", str(it),
               *run_flags(name)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            sys.exit(f"span_sweep.py: error: {name} failed:\n{proc.stderr[-2000:]}")
        found = re.findall(r"ms/batch: ([0-9.]+)", proc.stdout)
        record = {"step": it * args.nbatches, "head_spans": head_spans(folder / "model.pt"),
                  "ms": float(found[-1]) if found else None}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name} step {record['step']}: {record['head_spans']} {record['ms']} ms/step", flush=True)


def score(name: str, args, ids, dist) -> dict:
    path = args.out / name / "score.json"
    if path.exists():
        return json.loads(path.read_text())
    ckpt = ckpt_io.load_checkpoint(args.out / name / "model.pt", log=lambda msg: None)
    model = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))
    ckpt_io.load_model_state(model, ckpt, args.out / name / "model.pt")
    start = time.perf_counter()
    nll, row_start = copy_score.token_nll(model, ids, args.score_rows, args.block)
    result = copy_score.score(nll, dist, row_start)
    result["seconds"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def reach_fraction(span: int, cfg: dict) -> float:
    """The share of planted distances (log-uniform over [min, max]) at most ``span``."""
    lo, hi = cfg["min_distance"], cfg["max_distance"]
    return min(1.0, max(0.0, math.log(max(span, lo) / lo) / math.log((hi + 1) / lo)))


def band_bpc(sc: dict, lo: int, hi: int) -> float:
    """bpc over the copied octaves [lo, hi) of a score (token-weighted)."""
    parts = [v for k, v in sc.items() if k.startswith("copied_") and k[7:].split("-")[0].isdigit()
             and lo <= int(k[7:].split("-")[0]) < hi]
    tokens = sum(v["tokens"] for v in parts)
    return sum(v["bpc"] * v["tokens"] for v in parts) / tokens if tokens else math.nan


def row(name: str, args, plant_cfg: dict) -> dict:
    records = [json.loads(line) for line in (args.out / name / "spans.jsonl").read_text().splitlines()]
    by_step = {r["step"]: sorted(s for layer in r["head_spans"] for s in layer) for r in records}
    last = records[-1]
    spans = by_step[last["step"]]
    ms = [r["ms"] for r in records if r["ms"] is not None]
    sc = json.loads((args.out / name / "score.json").read_text())
    return {"run": name, "init": RUNS[name][0], "ramp": RUNS[name][1], "loss": RUNS[name][2],
            "seed": RUNS[name][4], "steps": last["step"],
            "longest_by_step": {s: v[-1] for s, v in by_step.items()},
            "median_by_step": {s: statistics.median(v) for s, v in by_step.items()},
            "final_spans": last["head_spans"], "heads_ge_512": sum(s >= 512 for s in spans),
            "heads_ge_2048": sum(s >= 2048 for s in spans), "reach": reach_fraction(spans[-1], plant_cfg),
            "ms_per_step": statistics.median(ms) if ms else None,
            "bpc_ordinary": sc["ordinary"]["bpc"], "bpc_copied": sc["copied"]["bpc"],
            "bpc_copied_64_255": band_bpc(sc, 64, 256), "bpc_copied_1024_4096": band_bpc(sc, 1024, 4097),
            "score": sc}


def print_table(rows: list, steps: list) -> None:
    head = (["run", "init", "ramp", "loss", "seed", "steps"] + [f"max@{s}" for s in steps] + ["max@end"] +
            ["median@end", ">=512", ">=2048", "reach", "ms/step", "bpc ord", "bpc copy", "copy 64-255",
             "copy 1024-4096"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["run"], f"{r['init']:g}", str(r["ramp"]), f"{r['loss']:g}", str(r["seed"]), str(r["steps"])]
        cells += [str(r["longest_by_step"].get(s, "")) for s in steps]
        cells += [str(r["longest_by_step"][r["steps"]]), f"{r['median_by_step'][r['steps']]:g}", f"{r['heads_ge_512']}/16", f"{r['heads_ge_2048']}/16",
                  f"{r['reach']:.0%}", f"{r['ms_per_step']:.0f}", f"{r['bpc_ordinary']:.3f}", f"{r['bpc_copied']:.3f}",
                  f"{r['bpc_copied_64_255']:.3f}", f"{r['bpc_copied_1024_4096']:.3f}"]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a planted corpus (scripts/plant_repeats.py)")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs (reused when called again)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="which runs (default all)")
    p.add_argument("--nbatches", type=int, default=50, help="steps per iteration (one span reading each)")
    p.add_argument("--iters", type=int, default=6, help="iterations per run")
    p.add_argument("--score-tokens", type=int, default=32768, help="valid tokens scored per run")
    p.add_argument("--score-rows", type=int, default=4, help="streams the scored tokens are cut into")
    p.add_argument("--block", type=int, default=64, help="block length of the scoring (the training's)")
    p.add_argument("--train-only", action="store_true", help="train, do not score or print the table")
    args = p.parse_args(argv)
    plant_cfg = json.loads((args.data / ".prepared.json").read_text())["plant"]
    torch.set_num_threads(1)
    for name in args.runs:
        train(name, args)
    if args.train_only:
        return 0
    side = planted.read_side_file(args.data)
    ids = load_corpus(DataConfig(str(args.data), cache_dir=str(args.out / "cache"))).valid[:args.score_tokens]
    dist = planted.copy_distances(side["valid"], side["tokens"]["valid"] + 1)[:args.score_tokens]
    rows = []
    for name in args.runs:
        score(name, args, ids, dist)
        rows.append(row(name, args, plant_cfg))
    steps = [s for s in sorted(rows[0]["longest_by_step"]) if s % 100 == 0 and s <= args.iters * args.nbatches]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
