"""The timing phase of scripts/study.py: ms per training step of trained checkpoints, the
configurations alternating in one process (scripts/measure.py's interleaved timer).

    OMP_NUM_THREADS=1 python scripts/study_timing.py --data DIR --out OUT/timing.json \
        --steps 10 NAME=CKPT [NAME=CKPT ...]

Each checkpoint's model (with its learned spans and its --attn-impl) runs forward and backward
on consecutive training blocks of --data, its cache carried, at the batch and block size it was
trained with; no optimizer update, so the spans stay as learned while timed. An Expire-span
model's memory first fills: ceil((L + R) / M) blocks forward without gradients, so that it is
timed at the memory its learned spans keep (its length per layer is written). Two warm-up steps
each, then --steps repeats in which every configuration takes one step, the order alternating.
First waits (--wait seconds at most) for the 1-minute load average to fall to --idle-load.
Writes the median wall and CPU ms per step of each, the 1-minute load average before and after
(a timing from a loaded machine is not a speed figure), and the process's peak RSS.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import checkpoint as ckpt_io  # noqa: E402
import expire_span  # noqa: E402
import measure  # noqa: E402  (scripts/measure.py)
from data import DataConfig, batchify, load_corpus  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from train_state import load_model_state  # noqa: E402


def training_step(ckpt_path: Path, ids):
    """A closure doing one forward and backward of the checkpoint's model on the next block."""
    ckpt = ckpt_io.load_checkpoint(ckpt_path, log=lambda msg: None)
    model = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))
    load_model_state(model, ckpt, ckpt_path)
    model.train()
    B, M = ckpt["config"]["train"]["batch_size"], ckpt["config"]["train"]["block_size"]
    rows = torch.from_numpy(batchify(ids, B).astype("int64"))  # (B, n)
    state = {"pos": 0, "caches": model.init_cache(B)}
    info = {"span_avg": model.span_stats().get("span_avg"), "attn_impl": model.cfg.attn_impl}
    if model.cfg.expire_span:  # fill the memory to what the learned spans keep, without gradients
        cfg = model.cfg
        with torch.no_grad():
            for _ in range(-(-(cfg.attn_lim + cfg.expire_span_ramp) // M)):
                x = rows[:, state["pos"]:state["pos"] + M]  # (B, M)
                _, state["caches"] = model(x, state["caches"])
                state["pos"] += M
        layers = expire_span.memory_stats(state["caches"])
        info.update(expire_span.summary(layers), mem_layers=[s["mem"] for s in layers])

    def step():
        p = state["pos"]
        if p + M + 1 > rows.shape[1]:
            p, state["caches"] = 0, model.init_cache(B)
        x, y = rows[:, p:p + M], rows[:, p + 1:p + M + 1]  # (B, M) each
        nll, state["caches"] = model(x, state["caches"], y)  # (B, M)
        (nll.mean() + model.span_loss()).backward()
        model.zero_grad(set_to_none=True)
        state["pos"] = p + M

    return step, info


def wait_for_idle(load: float, seconds: float) -> float:
    """Wait (up to ``seconds``) for the 1-minute load average to fall to ``load`` (it decays for a
    minute or so after the study's runs end); the load average when the wait ends."""
    end = time.time() + seconds
    while os.getloadavg()[0] > load and time.time() < end:
        time.sleep(5)
    return os.getloadavg()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--idle-load", type=float, default=1.0, help="wait for the load average to fall to this")
    p.add_argument("--wait", type=float, default=240, help="seconds to wait for it at most")
    p.add_argument("timed", nargs="+", help="NAME=CHECKPOINT")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = wait_for_idle(args.idle_load, args.wait)
    ids = load_corpus(DataConfig(args.data)).split("train")
    steps, info = {}, {}
    for spec in args.timed:
        name, path = spec.split("=", 1)
        steps[name], info[name] = training_step(Path(path), ids)
    for step in steps.values():  # warm-up: thread pools, first allocations
        step()
        step()
    wall, cpu = measure.time_interleaved_cpu(steps, "cpu", args.steps)
    result = {"ms": {n: 1000 * s for n, s in wall.items()}, "cpu_ms": {n: 1000 * s for n, s in cpu.items()},
              "steps": args.steps, "models": info, "load_before": load_before, "load_after": os.getloadavg()[0],
              "process_peak_mb": measure.process_peak_rss_bytes() / 2**20, "torch": torch.__version__}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    for n in steps:
        print(f"timing {n}: {result['ms'][n]:.1f} ms/step (CPU {result['cpu_ms'][n]:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
