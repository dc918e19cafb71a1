"""Measure the papers' central claims on a grid of runs: train, evaluate, time, judge, report.

    python scripts/study.py --preset {quick,cpu,longrange,gpu} --data DIR --out OUT [--jobs J] [--dry-run]

A preset (scripts/study_presets.py) is a model and schedule and a list of configurations (span
settings), each run at every seed of the preset (run NAME-sSEED). The criteria of each preset are
written before its runs (scripts/study_criteria.py); OUT/criteria.json records them before the
first run, and a study whose criteria differ from that record refuses to report.

Each run is one `python main.py ... --checkpoint OUT/runs/NAME/model.pt` subprocess (torchrun for
the gpu preset), then its evaluation: `main.py --full-eval-mode` on the whole dev and test sets
(batch 8), or on the planted corpus of the longrange preset `scripts/score_copies.py` on the first
N tokens of valid and test (bpc on copied and ordinary positions apart). On CPU each process
gets the cores divided among the J jobs (threads.per_process: 1 thread each for --jobs 2 on 2
cores), or OMP_NUM_THREADS where it is set. After the runs, the timing phase
(scripts/study_timing.py) times a training step of the seed-1 checkpoints of the preset's timed
configurations, alternating in one process (OUT/timing.json, with the load average: speed
verdicts need an idle machine). Speed is never taken from the runs' tokens/s.

longrange: --data is the enwik8 prefix (enwik8.zip, a text file, or a folder made by
scripts/get_data.sh enwik8), planted into OUT/planted with scripts/plant_repeats.py before the runs
(distances up to 4096), or a planted folder (with copies.json) used as it is.

Before the runs, the token cache of the data is built in a process of its own (scripts/cache_memory.py),
so that each run's peak memory is its training alone; the build's figures go to OUT/cache_build.json
and the report. Writes OUT/criteria.json (before the first run), OUT/results.json (one record per
run), OUT/timing.json, OUT/verdicts.json (each criterion's verdict and numbers), OUT/fig_*.png
(matplotlib; skipped with a message when it is missing), OUT/report.md, and per run OUT/runs/NAME/{model.pt, model.logs/,
train.log, eval.log, record.json}. A run with a record.json is skipped; an interrupted run resumes
from its checkpoint. One progress line per finished run. --dry-run prints each run's main.py
command line and parameter count, and the preset's estimated duration, and trains nothing.
"""
import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import flags as main_flags  # noqa: E402
import flops  # noqa: E402
import planted  # noqa: E402
import study_criteria  # noqa: E402  (scripts/study_criteria.py)
import study_report  # noqa: E402  (scripts/study_report.py)
from build import model_config  # noqa: E402
from data import DataConfig, load_corpus  # noqa: E402
from models import TransformerSeq  # noqa: E402
from settings import Settings  # noqa: E402
from threads import per_process  # noqa: E402
from study_presets import PRESETS, TIMING_WAIT_S, Preset, Run, build_grid, describe, run_order  # noqa: E402
from study_run import (STOP, eval_commands, execute, stop_children,  # noqa: E402
                       train_command)
from utils import ConfigError  # noqa: E402


# ---- before the runs: the data and the criteria --------------------------------------
def enwik8_folder_bytes(folder: Path) -> tuple:
    """The bytes of a reference-format enwik8 folder (train, valid, test in order: every byte as
    its decimal value, one space between, a newline byte as a line break), and the test size."""
    parts = []
    for split in planted.SPLITS:
        path = folder / f"{split}.txt"
        try:
            parts.append(bytes(10 if t == b"\n" else int(t) for t in path.read_bytes().split(b" ")))
        except (OSError, ValueError):
            raise ConfigError(f"--data {folder}: {path} is missing or not in the enwik8 format; give the enwik8 "
                              "prefix file (e.g. ../shared/data/enwik8-4M/enwik8.zip), a folder made by "
                              "scripts/get_data.sh enwik8, or a planted folder") from None
    if len(parts[1]) != len(parts[2]):
        raise ConfigError(f"--data {folder}: valid and test differ in size; give the enwik8 prefix file instead")
    return b"".join(parts), len(parts[2])


def planted_data(preset: Preset, data: Path, out: Path) -> Path:
    """The planted folder the longrange runs train on: --data itself when it is planted, else
    OUT/planted, made with scripts/plant_repeats.py from --data: a text file, a one-member zip
    (e.g. enwik8.zip; valid and test of 200,000 bytes each), or an enwik8-format folder (its bytes
    in order, valid and test at the folder's sizes)."""
    if (data / planted.SIDE_FILE).is_file():
        return data
    target, source, test_size = out / "planted", data, 200_000
    if (target / planted.SIDE_FILE).is_file():
        made = json.loads((target / ".prepared.json").read_text())
        if made["plant"]["max_distance"] != preset.planted["max_distance"]:
            raise ConfigError(f"--out {out}: {target} was planted with other settings; use another --out")
        return target
    out.mkdir(parents=True, exist_ok=True)
    if data.is_dir():
        raw, test_size = enwik8_folder_bytes(data)
        source = out / "planted_source.bytes"
        source.write_bytes(raw)
    cmd = [sys.executable, str(ROOT / "scripts" / "plant_repeats.py"), str(source), str(target),
           "--max-distance", str(preset.planted["max_distance"]), "--test-size", str(test_size)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"--data {data}: planting failed: {proc.stderr.strip()[-500:]}")
    print(proc.stdout.strip(), flush=True)
    return target


def record_criteria(name: str, out: Path) -> List[dict]:
    """OUT/criteria.json: written before the first run; an existing record must equal the code's."""
    criteria = [c.to_dict() for c in study_criteria.CRITERIA[name]]
    path = out / "criteria.json"
    if path.exists():
        if json.loads(path.read_text()) != json.loads(json.dumps(criteria)):
            raise ConfigError(f"--out {out}: the criteria in scripts/study_criteria.py differ from those "
                              f"recorded before the runs ({path}); criteria are not changed after the runs: "
                              "use another --out for new criteria")
        return criteria
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(criteria, indent=1) + "\n")
    return criteria


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
    todo = [run for run in run_order(runs, preset) if records[run.name] is None]
    lock = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        threads = 0 if preset.gpus else per_process(jobs)  # CPU threads of each run's processes
        futures = {pool.submit(execute, run, preset, data, out, threads): run for run in todo}
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


# ---- after the runs: the timing phase -----------------------------------------------
def timing_phase(preset: Preset, records: dict, data: Path, out: Path, wait_s: int) -> Optional[dict]:
    """OUT/timing.json (scripts/study_timing.py on the first seed's checkpoints), made once when every
    timed configuration's first-seed run has finished; None until then. It waits up to ``wait_s`` for
    the load average to fall after the runs."""
    path = out / "timing.json"
    if path.exists():
        return json.loads(path.read_text())
    seed = preset.seeds[0]
    names = [f"{c}-s{seed}" for c in preset.timed]
    if not names or any(records.get(n) is None for n in names) or STOP.is_set():
        return None
    cmd = [sys.executable, str(ROOT / "scripts" / "study_timing.py"), "--data", str(data), "--out", str(path),
           "--steps", str(preset.timing_steps), "--idle-load", str(study_criteria.IDLE_LOAD),
           "--wait", str(wait_s)] + [f"{c}={out / 'runs' / n / 'model.pt'}" for c, n in zip(preset.timed, names)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if proc.returncode != 0:
        print(f"timing phase FAILED: {proc.stderr.strip()[-1000:]}", flush=True)
        return None
    print(proc.stdout.strip(), flush=True)
    return json.loads(path.read_text())


def dry_run_vocab(data: Path, source: Path, preset: Preset) -> Tuple[int, str]:
    """The vocabulary size the runs will have and where it comes from: the data's own (read as
    main.py reads it, through the token cache), else that of the source a planted corpus is
    made from (planting copies adds no symbol), else the preset's (enwik8's)."""
    for path in (data, source):
        if path.exists() and path.suffix != ".zip":
            return len(load_corpus(DataConfig(str(path))).vocab), f"of {path}"
    return preset.vocab, "enwik8's; the data is not prepared yet"


def dry_run(runs: List[Run], preset: Preset, name: str, data: Path, source: Path, out: Path,
            jobs: int) -> None:
    vocab, where = dry_run_vocab(data, source, preset)
    for run in runs:
        args = main_flags.build_parser().parse_args([*run.flags, "--data", str(data)])
        cfg = model_config(Settings.from_args(args), vocab)
        with torch.device("meta"):  # counts the parameters without allocating them
            params = TransformerSeq(cfg).num_parameters()
        ckpt = out / "runs" / run.name / "model.pt"
        print(f"{run.name} (params {params:,} with vocabulary {vocab}, {where}):")
        print("  " + " ".join(train_command(run, preset, data, ckpt)))
        for cmd in eval_commands(preset, data, ckpt):
            print("  " + " ".join(cmd))
    print(describe(name, jobs))


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
    presets = "\n".join("  " + describe(name) for name in PRESETS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets (durations ESTIMATED from step times, not measured):\n" + presets)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--data", required=True, help="reference-format folder (scripts/get_data.sh), or a text file; "
                   "longrange: the enwik8 prefix file, or a planted folder")
    p.add_argument("--out", required=True, help="output folder; rerunning skips finished runs")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 with torchrun)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's commands and parameters and the estimated duration; train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write results.json, the figures and report.md from the finished runs; train nothing "
                        "(safe while another study.py works on the same --out)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="for smoke tests only: cap every run at N steps (the figures are then not the preset's)")
    return p


def prepare(args, preset: Preset, runs: List[Run], data: Path, out: Path):
    """Check, record the criteria, plant the data (longrange), run the grid; the records and data."""
    check_args(args)
    if args.dry_run:
        return None, data
    record_criteria(args.preset, out)  # OUT/criteria.json, before the first run
    if preset.planted:
        data = planted_data(preset, data, out)
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, stop_children)
    if args.report_only:
        return {run.name: load_record(run, out) for run in runs}, data
    build_token_cache(data, out)
    return run_grid(runs, preset, data, out, args.jobs), data


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    args.jobs = args.jobs if args.jobs is not None else (1 if preset.gpus else 2)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    runs = build_grid(preset, args.max_steps)
    try:
        records, data = prepare(args, preset, runs, data, out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if records is None:  # --dry-run: the longrange runs read OUT/planted when --data is a file
        shown = out / "planted" if preset.planted and not (data / planted.SIDE_FILE).is_file() else data
        dry_run(runs, preset, args.preset, shown, data, out, args.jobs)
        return 0
    timing = None if args.report_only and not (out / "timing.json").exists() else \
        timing_phase(preset, records, data, out, wait_s=0 if args.max_steps else TIMING_WAIT_S)
    finished = [records[run.name] for run in runs if records[run.name] is not None]
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps([r["result"] for r in finished], indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    verdicts = study_criteria.evaluate(study_criteria.CRITERIA[args.preset], [r["result"] for r in finished], timing)
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    note = preset.note + (f" This study was capped at {args.max_steps} steps (--max-steps)."
                          if args.max_steps else "") + cache_note(out)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    study_report.write(finished, out, args.preset, note, "python scripts/study.py " + " ".join(argv), len(runs),
                       verdicts, timing)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'} ({len(finished)} of {len(runs)} runs)")
    if STOP.is_set():
        print("stopped by SIGTERM: the same command resumes the unfinished runs")
        return 128 + signal.SIGTERM
    return 0 if len(finished) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
