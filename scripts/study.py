"""Measure the papers' central claims on a grid of runs: train, evaluate, tabulate, draw, report.

    python scripts/study.py --preset {quick,cpu,gpu} --data DIR --out OUT [--jobs J] [--dry-run]

The grid (the same model and schedule; only the span settings differ):
  fixed-64, fixed-256, fixed-1024        fixed span L = 64, 256, 1024
  adaptive-256, -1024, -8192             adaptive span (--adapt-span --adapt-span-cache), max L
  allattn-8192                           all-attention: persistent memory and no feed-forward,
                                         deeper so that its parameter count matches the
                                         feed-forward model adaptive-8192 (the papers' recipe:
                                         N = 2H persistent vectors, 3/2 the layers)
Each run is one `python main.py ... --checkpoint OUT/runs/NAME/model.pt` subprocess (torchrun for
the gpu preset), then `main.py --full-eval-mode` on the whole dev and test sets (the default
protocol, batch 8). Each process gets OMP_NUM_THREADS=1 on CPU, so --jobs J uses J cores.

Before the runs, the token cache of --data is built in a process of its own (scripts/cache_memory.py),
so that each run's peak memory is its training alone; the build's figures go to OUT/cache_build.json
and the report. Writes OUT/results.json (one record per run), OUT/fig_*.png (matplotlib; skipped with a message
when it is missing), OUT/report.md, and per run OUT/runs/NAME/{model.pt, model.logs/, train.log,
eval.log, record.json}. A run with a record.json is skipped; an interrupted run resumes from its
checkpoint (main.py resumes when the checkpoint exists). One progress line per finished run.

Presets: `quick` (minutes), `cpu` (about an hour on 2 cores), `gpu` (one 8-GPU node, torchrun;
the 12-layer enwik8 shape on the full enwik8 at a shortened schedule). --dry-run prints each run's
main.py command line and parameter count and trains nothing.
"""
import argparse
import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import checkpoint as ckpt_io  # noqa: E402
import flops  # noqa: E402
import study_report  # noqa: E402  (scripts/study_report.py)
from build import model_config  # noqa: E402
import flags as main_flags  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from settings import Settings  # noqa: E402
from train_state import load_model_state  # noqa: E402
from utils import ConfigError  # noqa: E402

RESULT_KEYS = ("name", "max_span", "adaptive", "pers_mem_size", "params", "steps", "dev_bpc", "test_bpc",
               "attn_flops_per_token", "model_flops_per_token", "tokens_per_s", "peak_mem_mb",
               "span_avg", "span_max", "head_spans")
TRAIN = ["--optim", "adagrad", "--lr", "0.07", "--momentum", "0", "--grad-clip", "0.03"]
ADAPTIVE = ["--adapt-span", "--adapt-span-cache", "--adapt-span-init", "0"]


@dataclass(frozen=True)
class Preset:
    model: List[str]  # model shape and batch, shared by every run
    pers: List[str]  # the all-attention model's shape (replaces the FF model's)
    span_loss: str  # --adapt-span-loss
    steps: int
    nbatches: int  # steps per iteration: one checkpoint, one logged point
    warmup: int
    gpus: int = 0  # 0: python main.py on CPU; G: torchrun --nproc_per_node=G
    vocab: int = 205  # enwik8's, for --dry-run without data
    note: str = ""  # how the schedule was sized (goes into the report)


CPU_MODEL = ["--nlayers", "4", "--hid-sz", "128", "--inner-hid-sz", "512", "--nheads", "4",
             "--block-sz", "128", "--batch-sz", "16", "--dropout", "0"]
CPU_PERS = ["--nlayers", "6", "--pers-mem-size", "256", "--inner-hid-sz", "1"]
CPU_NOTE = ("The schedule is sized by the step time of each run's `python main.py` command (the "
            "commands that `python scripts/study.py --preset cpu --dry-run` prints), 30 steps each with "
            "OMP_NUM_THREADS=1, one run at a time; the figures are in docs/performance.md (study presets).")
PRESETS = {
    "quick": Preset(CPU_MODEL, CPU_PERS, "2e-6", steps=100, nbatches=20, warmup=10,
                    note="The cpu preset's model at 1/10 of its steps. " + CPU_NOTE),
    "cpu": Preset(CPU_MODEL, CPU_PERS, "2e-6", steps=1000, nbatches=100, warmup=100, note=CPU_NOTE),
    "gpu": Preset(["--nlayers", "12", "--hid-sz", "512", "--inner-hid-sz", "2048", "--nheads", "8",
                   "--block-sz", "512", "--batch-sz", "64", "--dropout", "0.3"],
                  ["--nlayers", "18", "--pers-mem-size", "1024", "--inner-hid-sz", "1", "--batch-split", "2"],
                  "5e-7", steps=20000, nbatches=1000, warmup=4000, gpus=8,
                  note="The 12-layer enwik8 shape (scripts/enwik8.sh) at 20k of its 600k steps, warm-up "
                       "4k of 32k; the all-attention model is scripts/enwik8_pers_small.sh's shape. "
                       "Not run here (no GPU): its timings are not measured."),
}


@dataclass
class Run:
    name: str
    max_span: int
    adaptive: bool
    pers_mem_size: int
    flags_span: List[str]  # the span settings
    flags: List[str] = field(default_factory=list)  # main.py flags, without --data / --checkpoint


def override(flags: List[str], new: List[str]) -> List[str]:
    """``flags`` with the values of the flags in ``new`` replaced in place; the others appended."""
    flags = list(flags)
    i = 0
    while i < len(new):
        has_value = i + 1 < len(new) and not new[i + 1].startswith("--")
        if new[i] in flags and has_value:
            flags[flags.index(new[i]) + 1] = new[i + 1]
        elif new[i] not in flags:
            flags += new[i:i + 1 + has_value]
        i += 1 + has_value
    return flags


def build_grid(preset: Preset, max_steps: int = 0) -> List[Run]:
    steps = min(preset.steps, max_steps) if max_steps else preset.steps
    nb = min(preset.nbatches, steps)
    schedule = TRAIN + ["--nbatches", str(nb), "--niter", str(math.ceil(steps / nb)),
                        "--lr-warmup", str(min(preset.warmup, steps))]
    adaptive = ADAPTIVE + ["--adapt-span-loss", preset.span_loss]
    pers_n = int(preset.pers[preset.pers.index("--pers-mem-size") + 1])
    runs = [Run(f"fixed-{L}", L, False, 0, ["--attn-span", str(L)]) for L in (64, 256, 1024)]
    runs += [Run(f"adaptive-{L}", L, True, 0, ["--attn-span", str(L)] + adaptive) for L in (256, 1024, 8192)]
    runs.append(Run("allattn-8192", 8192, True, pers_n, ["--attn-span", "8192"] + adaptive))
    for run in runs:
        run.flags = override(preset.model, preset.pers) if run.pers_mem_size else list(preset.model)
        run.flags += schedule + run.flags_span
    return runs


def run_order(runs: List[Run]) -> List[Run]:
    """Longest first (fixed spans by length, then the adaptive ones), so J workers pack well."""
    return sorted(runs, key=lambda r: (r.adaptive, -r.pers_mem_size, -r.max_span))


# ---- commands ---------------------------------------------------------------------
def train_command(run: Run, preset: Preset, data: Path, ckpt: Path) -> List[str]:
    args = ["main.py", *run.flags, "--data", str(data), "--checkpoint", str(ckpt)]
    if preset.gpus:
        return ["torchrun", "--standalone", f"--nproc_per_node={preset.gpus}", *args, "--distributed"]
    return [sys.executable, *args]


def eval_command(data: Path, ckpt: Path) -> List[str]:
    return [sys.executable, "main.py", "--data", str(data), "--checkpoint", str(ckpt),
            "--full-eval-mode", "--batch-sz", "8"]


RUNNING = set()  # the child processes, asked to checkpoint and stop when this script gets SIGTERM
STOP = threading.Event()  # set by SIGTERM: start no further process


def stop_children(signum, frame) -> None:
    STOP.set()
    for proc in list(RUNNING):
        proc.send_signal(signal.SIGTERM)  # main.py writes its checkpoint and exits


def run_logged(cmd: List[str], log_path: Path, cpu: bool) -> tuple:
    """Run ``cmd`` in the repository root, appending its output to ``log_path``. Returns the exit
    status and the usage: wall and CPU seconds, peak resident MB of the largest process of the tree."""
    if STOP.is_set():
        raise RuntimeError("stopped by SIGTERM; a rerun resumes it")
    env = {**os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if cpu else {})}
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


def parse_eval(text: str) -> dict:
    found = dict(re.findall(r"^(val|test): ([0-9.]+)bpc", text, flags=re.M))
    if set(found) != {"val", "test"}:
        raise RuntimeError("the evaluation printed no 'val:' and 'test:' bpc lines")
    return {"dev_bpc": float(found["val"]), "test_bpc": float(found["test"])}


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


def model_figures(run: Run, ckpt_path: Path) -> dict:
    """Parameters, FLOPs and spans of the trained model in the checkpoint."""
    ckpt = ckpt_io.load_checkpoint(ckpt_path, log=lambda msg: None)
    model = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))
    load_model_state(model, ckpt, ckpt_path)
    cost = flops.flops_per_token(model)
    stats = model.span_stats()
    return {"params": model.num_parameters(), "steps": int(ckpt["step"]),
            "attn_flops_per_token": cost.attn, "model_flops_per_token": cost.model,
            "span_avg": stats.get("span_avg", float(run.max_span)),
            "span_max": stats.get("span_max", float(run.max_span)),
            "head_spans": model.head_spans() if run.adaptive else None,
            "history": ckpt["logger"]}


def make_record(run: Run, folder: Path, evals: dict, peak_mb: float, seconds: dict) -> dict:
    fig = model_figures(run, folder / "model.pt")
    metrics = read_metrics(folder / "model.logs")
    speeds = sorted(m["tokens_per_s"] for m in metrics if "tokens_per_s" in m)
    result = {"name": run.name, "max_span": run.max_span, "adaptive": run.adaptive,
              "pers_mem_size": run.pers_mem_size, **{k: v for k, v in fig.items() if k != "history"},
              **evals, "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
              "peak_mem_mb": round(peak_mb, 1)}
    history = fig["history"]
    curves = {"step": history.get("step", []), "train_bpc": history.get("train_bpc", []),
              "val_bpc": history.get("val_bpc", []),
              "flops_step": [m["step"] for m in metrics if "flops/attn_flops" in m],
              "attn_flops": [m["flops/attn_flops"] for m in metrics if "flops/attn_flops" in m]}
    return {"flags": run.flags, "result": {k: result[k] for k in RESULT_KEYS}, "curves": curves,
            "seconds": seconds}


def execute(run: Run, preset: Preset, data: Path, out: Path) -> Optional[dict]:
    if STOP.is_set():
        raise RuntimeError("not started (SIGTERM)")
    folder = out / "runs" / run.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flags.json").write_text(json.dumps(run.flags))
    ckpt, cpu = folder / "model.pt", preset.gpus == 0
    fresh = not ckpt.exists()
    rc, usage = run_logged(train_command(run, preset, data, ckpt), folder / "train.log", cpu)
    train = add_usage(folder / "train_usage.json", usage, complete=fresh)
    if STOP.is_set():
        raise RuntimeError("stopped by SIGTERM; a rerun resumes it from its checkpoint")
    if rc != 0:
        raise RuntimeError(f"training exited with status {rc}; see {folder / 'train.log'}")
    (folder / "eval.log").write_text("")
    rc, evaluation = run_logged(eval_command(data, ckpt), folder / "eval.log", cpu)
    if rc != 0:
        raise RuntimeError(f"evaluation exited with status {rc}; see {folder / 'eval.log'}")
    seconds = {"train": round(train["wall_s"], 1), "eval": round(evaluation["wall_s"], 1),
               "eval_cpu": round(evaluation["cpu_s"], 1)}
    if train["complete"]:  # every training process was counted
        seconds["train_cpu"] = round(train["cpu_s"], 1)
    record = make_record(run, folder, parse_eval((folder / "eval.log").read_text()), train["peak_mem_mb"],
                         seconds)
    tmp = folder / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / "record.json")
    return record


def build_token_cache(data: Path, out: Path) -> None:
    """Tokenise the data into the cache the runs read, in a process of its own before any run
    (scripts/cache_memory.py --default-cache), so that every run's peak memory is its training
    alone and the build's peak is reported apart. OUT/cache_build.json keeps the figures of
    the build (a later study that finds the cache built leaves the file as it is)."""
    record = out / "cache_build.json"
    tmp = out / "cache_build.json.tmp"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_memory.py"), "--data", str(data),
                           "--default-cache", "--json", str(tmp)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"building the token cache failed:\n{proc.stderr[-2000:]}")
    result = json.loads(tmp.read_text())
    if result["built"] or not record.exists():
        os.replace(tmp, record)
        print(proc.stdout.strip(), flush=True)
    tmp.unlink(missing_ok=True)


def cache_note(out: Path) -> str:
    """The token-cache build's figures for the report (OUT/cache_build.json), or ''."""
    path = out / "cache_build.json"
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    if not r["built"]:
        return " The token cache existed before this study (its build was not measured)."
    return (f" The token cache was built before the runs, in a process of its own: {r['cache_mb']:.0f} MB "
            f"in {r['seconds']:.0f} s, peak resident size {r['build_peak_mb']:.0f} MB over the "
            f"{r['rss_before_mb']:.0f} MB of the process before it (whole process {r['process_peak_mb']:.0f} MB); "
            "each run's peak memory (peak_mem_mb, the whole training process's ru_maxrss) is training alone.")


# ---- the grid -----------------------------------------------------------------------
def load_record(run: Run, out: Path) -> Optional[dict]:
    """The finished run's record, or None; a folder made with other flags is an error."""
    folder = out / "runs" / run.name
    flags_file = folder / "flags.json"
    if flags_file.exists() and json.loads(flags_file.read_text()) != run.flags:
        raise ConfigError(f"--out {out}: {folder} was trained with other flags than this preset's "
                          f"({flags_file}); use another --out, or delete that folder to retrain it")
    path = folder / "record.json"
    return json.loads(path.read_text()) if path.exists() else None


def progress_line(i: int, total: int, record: dict) -> str:
    r, s = record["result"], record["seconds"]
    return (f"[{i}/{total}] {r['name']}: dev {r['dev_bpc']:.3f} test {r['test_bpc']:.3f} bpc, "
            f"{r['steps']} steps, attn {flops.format_flops(r['attn_flops_per_token'])} FLOPs/token, "
            f"span avg {r['span_avg']:.0f} max {r['span_max']:.0f}, "
            f"train {s['train']:.0f} s, eval {s['eval']:.0f} s")


def run_grid(runs: List[Run], preset: Preset, data: Path, out: Path, jobs: int) -> dict:
    """Every run's record by name; finished runs are skipped, the others run ``jobs`` at a time."""
    records = {run.name: load_record(run, out) for run in runs}  # checks every folder first
    done = sum(r is not None for r in records.values())
    for name, record in records.items():
        if record is not None:
            print(f"skip {name}: finished ({out / 'runs' / name / 'record.json'})", flush=True)
    todo = [run for run in run_order(runs) if records[run.name] is None]
    lock = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(execute, run, preset, data, out): run for run in todo}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            with lock:
                done += 1
                try:
                    records[run.name] = future.result()
                    print(progress_line(done, len(runs), records[run.name]), flush=True)
                except RuntimeError as err:
                    status = "stopped" if STOP.is_set() else "FAILED"
                    print(f"[{done}/{len(runs)}] {run.name}: {status}: {err}", flush=True)
    return records


def dry_run(runs: List[Run], preset: Preset, data: Path, out: Path) -> None:
    for run in runs:
        args = main_flags.build_parser().parse_args([*run.flags, "--data", str(data)])
        cfg = model_config(Settings.from_args(args), preset.vocab)
        with torch.device("meta"):  # counts the parameters without allocating them
            params = TransformerSeq(cfg).num_parameters()
        ckpt = out / "runs" / run.name / "model.pt"
        print(f"{run.name} (params {params:,} with vocabulary {preset.vocab}):")
        print("  " + " ".join(train_command(run, preset, data, ckpt)))
        print("  " + " ".join(eval_command(data, ckpt)))


def check_args(args) -> None:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.max_steps < 0:
        raise ConfigError(f"--max-steps must be positive, got {args.max_steps}")
    if not args.dry_run and not Path(args.data).exists():
        raise ConfigError(f"--data {args.data} does not exist; prepare it, e.g. bash scripts/get_data.sh "
                          "enwik8 DIR --from-archive enwik8.zip --test-size 200000")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder")
    if args.report_only and not (Path(args.out) / "runs").is_dir():
        raise ConfigError(f"--report-only: --out {args.out} holds no runs; run the study first")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--data", required=True, help="reference-format folder (scripts/get_data.sh), or a text file")
    p.add_argument("--out", required=True, help="output folder; rerunning skips finished runs")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 with torchrun)")
    p.add_argument("--dry-run", action="store_true", help="print each run's commands and parameters; train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write results.json, the figures and report.md from the finished runs; train nothing "
                        "(safe while another study.py works on the same --out)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="for smoke tests only: cap every run at N steps (the figures are then not the preset's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    args.jobs = args.jobs if args.jobs is not None else (1 if preset.gpus else 2)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    runs = build_grid(preset, args.max_steps)
    try:
        check_args(args)
        if args.dry_run:
            dry_run(runs, preset, data, out)
            return 0
        torch.set_num_threads(1)
        signal.signal(signal.SIGTERM, stop_children)
        if args.report_only:
            records = {run.name: load_record(run, out) for run in runs}
        else:
            build_token_cache(data, out)
            records = run_grid(runs, preset, data, out, args.jobs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finished = [records[run.name] for run in runs if records[run.name] is not None]
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps([r["result"] for r in finished], indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    note = preset.note + (f" This study was capped at {args.max_steps} steps (--max-steps)."
                          if args.max_steps else "") + cache_note(out)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    study_report.write(finished, out, args.preset, note, "python scripts/study.py " + " ".join(argv), len(runs))
    print(f"wrote {out / 'results.json'} and {out / 'report.md'} ({len(finished)} of {len(runs)} runs)")
    if STOP.is_set():
        print("stopped by SIGTERM: the same command resumes the unfinished runs")
        return 128 + signal.SIGTERM
    return 0 if len(finished) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
