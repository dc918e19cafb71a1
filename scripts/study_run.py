"""One run of scripts/study.py: train (main.py), evaluate (main.py --full-eval-mode, or
scripts/score_copies.py on a planted corpus), and its record (OUT/runs/NAME/record.json).

A record is ``{"flags", "result", "curves", "seconds"}`` (and ``copy_scores`` on a planted
corpus): ``result`` holds the keys of results.json (RESULT_KEYS), ``curves`` the logged history
(step, train_bpc, val_bpc; flops_step, attn_flops; span_step, head_spans: every head's span
from step 0) and ``seconds`` the wall and CPU time of training and evaluation.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint as ckpt_io  # noqa: E402
import flops  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from study_presets import Preset, Run  # noqa: E402
from train_state import load_model_state  # noqa: E402

RESULT_KEYS = ("name", "config", "seed", "max_span", "adaptive", "pers_mem_size", "params", "steps", "dev_bpc",
               "test_bpc", "copied_bpc", "ordinary_bpc", "attn_flops_per_token", "model_flops_per_token",
               "tokens_per_s", "peak_mem_mb", "span_avg", "span_max", "head_spans", "expire", "mem_layers",
               "mem_avg", "mem_max", "dropped_frac", "octave_bpc")
RUNNING = set()  # the child processes, asked to checkpoint and stop when the study gets SIGTERM
STOP = threading.Event()  # set by SIGTERM: start no further process


def stop_children(signum, frame) -> None:
    STOP.set()
    for proc in list(RUNNING):
        proc.send_signal(signal.SIGTERM)  # main.py writes its checkpoint and exits


def run_logged(cmd: List[str], log_path: Path, threads: int) -> tuple:
    """Run ``cmd`` in the repository root with ``threads`` CPU threads (0: as the environment
    says), appending its output to ``log_path``. Returns the exit status and the usage: wall and
    CPU seconds, peak resident MB of the largest process of the tree."""
    if STOP.is_set():
        raise RuntimeError("stopped by SIGTERM; a rerun resumes it")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    start = time.time()
    with open(log_path, "a") as log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        RUNNING.add(proc)
        if STOP.is_set():  # SIGTERM came while it was starting
            proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        RUNNING.discard(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, {"wall_s": time.time() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
                             "peak_mem_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in KB on Linux


def add_usage(path: Path, usage: dict, complete: bool) -> dict:
    """Training usage summed (times) or maximised (memory) over the processes of a resumed run;
    ``complete`` is False when a process before the first counted one trained it (no usage file)."""
    total = (json.loads(path.read_text()) if path.exists()
             else {"wall_s": 0.0, "cpu_s": 0.0, "peak_mem_mb": 0.0, "complete": complete})
    total = {"wall_s": total["wall_s"] + usage["wall_s"], "cpu_s": total["cpu_s"] + usage["cpu_s"],
             "peak_mem_mb": max(total["peak_mem_mb"], usage["peak_mem_mb"]),
             "complete": total.get("complete", True)}
    path.write_text(json.dumps(total))
    return total


# ---- commands -------------------------------------------------------------------
def train_command(run: Run, preset: Preset, data: Path, ckpt: Path) -> List[str]:
    args = ["main.py", *run.flags, "--data", str(data), "--checkpoint", str(ckpt)]
    if preset.gpus:
        return ["torchrun", "--standalone", f"--nproc_per_node={preset.gpus}", *args, "--distributed"]
    return [sys.executable, *args]


def eval_commands(preset: Preset, data: Path, ckpt: Path) -> List[List[str]]:
    if preset.score_tokens:
        return [[sys.executable, "scripts/score_copies.py", "--checkpoint", str(ckpt), "--data", str(data),
                 "--split", split, "--tokens", str(preset.score_tokens), "--batch-sz", str(preset.score_rows)]
                for split in ("valid", "test")]
    return [[sys.executable, "main.py", "--data", str(data), "--checkpoint", str(ckpt), "--full-eval-mode",
             "--batch-sz", "8"]]


def parse_eval(text: str) -> dict:
    found = dict(re.findall(r"^(val|test): ([0-9.]+)bpc", text, flags=re.M))
    if set(found) != {"val", "test"}:
        raise RuntimeError("the evaluation printed no 'val:' and 'test:' bpc lines")
    return {"dev_bpc": float(found["val"]), "test_bpc": float(found["test"]), "copied_bpc": None,
            "ordinary_bpc": None}


def parse_scores(text: str) -> dict:
    """score_copies.py's lines: per split and group, bpc and tokens; the split's bpc over all of its
    scored tokens (ordinary, copied and copied_unseen, weighted by their tokens)."""
    groups = {}
    for split, group, bpc, n in re.findall(r"^(valid|test) (\S+): ([0-9.na]+)bpc tokens: (\d+)", text, flags=re.M):
        groups.setdefault(split, {})[group] = {"bpc": float(bpc), "tokens": int(n)}
    if set(groups) != {"valid", "test"}:
        raise RuntimeError("score_copies.py printed no valid and test lines")

    def whole(g):
        parts = [g[k] for k in ("ordinary", "copied", "copied_unseen") if k in g and g[k]["tokens"]]
        return sum(p["bpc"] * p["tokens"] for p in parts) / sum(p["tokens"] for p in parts)

    v = groups["valid"]
    return {"dev_bpc": whole(v), "test_bpc": whole(groups["test"]), "copied_bpc": v["copied"]["bpc"],
            "ordinary_bpc": v["ordinary"]["bpc"], "copy_scores": groups}


def read_metrics(logdir: Path) -> List[dict]:
    """main.py's metrics.jsonl, one record per step (the last written wins after a resume)."""
    path = logdir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


# ---- the record -------------------------------------------------------------------
def model_figures(run: Run, ckpt_path: Path, memory: Optional[List[int]] = None) -> dict:
    """Parameters, FLOPs and spans of the trained model in the checkpoint, and at step 0; with
    expire span, FLOPs at ``memory`` kept memories per layer (the longest possible when None)."""
    ckpt = ckpt_io.load_checkpoint(ckpt_path, log=lambda msg: None)
    initial = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))  # the spans at step 0
    model = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))
    load_model_state(model, ckpt, ckpt_path)
    cost = flops.flops_per_token(model, memory, ckpt["config"]["train"]["block_size"])
    stats = model.span_stats()
    return {"params": model.num_parameters(), "steps": int(ckpt["step"]),
            "attn_flops_per_token": cost.attn, "model_flops_per_token": cost.model,
            "span_avg": stats.get("span_avg", float(run.max_span)),
            "span_max": stats.get("span_max", float(run.max_span)),
            "head_spans": model.head_spans() if run.adaptive else None,
            "history": ckpt["logger"], "initial_spans": initial.head_spans(),
            "initial_attn_flops": flops.flops_per_token(initial).attn}


def span_curves(fig: dict, metrics: List[dict]) -> dict:
    """Every head's span by logged step, step 0 first; attention FLOPs by step, step 0 first."""
    heads = sorted({k for m in metrics for k in m if k.startswith("span_head/")})
    logged = [m for m in metrics if heads and all(k in m for k in heads)]
    flat0 = [s for layer in fig["initial_spans"] for s in layer]
    return {"span_step": [0] + [m["step"] for m in logged],
            "head_spans": [flat0] + [[int(m[k]) for k in heads] for m in logged],
            "flops_step": [0] + [m["step"] for m in metrics if "flops/attn_flops" in m],
            "attn_flops": [fig["initial_attn_flops"]] + [m["flops/attn_flops"] for m in metrics
                                                          if "flops/attn_flops" in m]}


def expire_figures(run: Run, metrics: List[dict]) -> dict:
    """Expire span, from the last logged iteration: the memory kept per layer (``mem_layers``),
    its mean and largest, the kept memories' mean and largest span, and ``dropped_frac`` =
    1 - mean kept memory / L (the share of the L positions within reach that are not kept)."""
    none = {"mem_layers": None, "mem_avg": None, "mem_max": None, "dropped_frac": None}
    if not run.expire:
        return none
    last = next((m for m in reversed(metrics) if "span/mem_avg" in m), None)
    if last is None:
        return none
    layers = [int(last[k]) for k in sorted(k for k in last if k.startswith("span_mem/layer_"))]
    return {"mem_layers": layers, "mem_avg": last["span/mem_avg"], "mem_max": last["span/mem_max"],
            "dropped_frac": 1 - last["span/mem_avg"] / run.max_span, "span_avg": last["span/span_avg"],
            "span_max": last["span/span_max"]}


def octave_bpc(evals: dict) -> Optional[dict]:
    """Valid bpc of the copied positions per distance octave (``copied_<lo>-<hi>``), by octave."""
    groups = evals.get("copy_scores", {}).get("valid", {})
    return {k[len("copied_"):]: g["bpc"] for k, g in groups.items()
            if k[len("copied_"):][:1].isdigit() and g["tokens"]} or None


def make_record(run: Run, folder: Path, evals: dict, peak_mb: float, seconds: dict) -> dict:
    metrics = read_metrics(folder / "model.logs")
    memory = expire_figures(run, metrics)
    fig = model_figures(run, folder / "model.pt", memory["mem_layers"])
    speeds = sorted(m["tokens_per_s"] for m in metrics if "tokens_per_s" in m)
    result = {"name": run.name, "config": run.config, "seed": run.seed, "max_span": run.max_span,
              "adaptive": run.adaptive, "pers_mem_size": run.pers_mem_size, **fig, **evals,
              **{k: v for k, v in memory.items() if v is not None or k not in fig}, "expire": run.expire,
              "octave_bpc": octave_bpc(evals),
              "tokens_per_s": speeds[len(speeds) // 2] if speeds else None, "peak_mem_mb": round(peak_mb, 1)}
    history = fig["history"]
    curves = {"step": history.get("step", []), "train_bpc": history.get("train_bpc", []),
              "val_bpc": history.get("val_bpc", []), **span_curves(fig, metrics)}
    record = {"flags": run.flags, "result": {k: result[k] for k in RESULT_KEYS}, "curves": curves,
              "seconds": seconds}
    if "copy_scores" in evals:
        record["copy_scores"] = evals["copy_scores"]
    return record


def execute(run: Run, preset: Preset, data: Path, out: Path, threads: int) -> Optional[dict]:
    """Train and evaluate one run (``threads`` CPU threads per process, 0 on GPUs); its record."""
    if STOP.is_set():
        raise RuntimeError("not started (SIGTERM)")
    folder = out / "runs" / run.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flags.json").write_text(json.dumps(run.flags))
    ckpt = folder / "model.pt"
    fresh = not ckpt.exists()
    rc, usage = run_logged(train_command(run, preset, data, ckpt), folder / "train.log", threads)
    train = add_usage(folder / "train_usage.json", usage, complete=fresh)
    if STOP.is_set():
        raise RuntimeError("stopped by SIGTERM; a rerun resumes it from its checkpoint")
    if rc != 0:
        raise RuntimeError(f"training exited with status {rc}; see {folder / 'train.log'}")
    (folder / "eval.log").write_text("")
    wall = cpu_s = 0.0
    for cmd in eval_commands(preset, data, ckpt):
        rc, evaluation = run_logged(cmd, folder / "eval.log", threads)
        if rc != 0:
            raise RuntimeError(f"evaluation exited with status {rc}; see {folder / 'eval.log'}")
        wall, cpu_s = wall + evaluation["wall_s"], cpu_s + evaluation["cpu_s"]
    text = (folder / "eval.log").read_text()
    evals = parse_scores(text) if preset.score_tokens else parse_eval(text)
    seconds = {"train": round(train["wall_s"], 1), "eval": round(wall, 1), "eval_cpu": round(cpu_s, 1)}
    if train["complete"]:  # every training process was counted
        seconds["train_cpu"] = round(train["cpu_s"], 1)
    record = make_record(run, folder, evals, train["peak_mem_mb"], seconds)
    tmp = folder / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / "record.json")
    return record
