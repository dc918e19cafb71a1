"""The measurements of scripts/bench.py that run in a fresh interpreter (``bench.py --worker``):
both paths' step times alternating in one process, one path's peak memory, the step
efficiency and torch.compile figures; ``spawn`` starts one and reads its JSON line.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flops  # noqa: E402
from bench_cases import IMPLS, make_step, medium_config, model_step, set_spans  # noqa: E402
from measure import matmul_seconds, peak_memory_mb, process_peak_rss_bytes, time_interleaved  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402

BENCH = Path(__file__).with_name("bench.py")  # the command line whose --worker runs a spec

def efficiency_worker(spec: dict) -> dict:
    """Medians of the medium model's step (both paths) and of a 512^3 fp32 matmul, all
    alternating in this process; FLOPs per step from flops.py (forward x 3)."""
    steps, step_flops = {}, {}
    for impl in IMPLS:
        cfg = dict(medium_config(spec["max_span"]).to_dict(), attn_impl=impl)
        steps[impl] = make_step(dict(spec, kind="model"), impl)
        steps[impl]()  # warm-up
        model = TransformerSeq(ModelConfig(**cfg))
        for layer in model.layers:
            set_spans(layer.span, spec["spans"])
        step_flops[impl] = 3 * flops.flops_per_token(model).model * 8 * 128
    steps["matmul"], mm_flops = matmul_seconds()
    times = time_interleaved(steps, "cpu", spec["repeats"])
    rate = mm_flops / times.pop("matmul")
    return {"matmul_flops_per_s": rate, **{impl: {"seconds": times[impl], "flops": step_flops[impl],
                                                  "efficiency": step_flops[impl] / times[impl] / rate}
                                           for impl in IMPLS}}


def compile_worker(spec: dict) -> dict:
    """The medium model's step (default path) eager and compiled: the first compiled step
    (compilation included), graphs, then medians of both alternating."""
    eager = model_step(medium_config(spec["max_span"]), spec["spans"], 8, 128, "cpu", False)
    compiled = model_step(medium_config(spec["max_span"]), spec["spans"], 8, 128, "cpu", False, True)
    eager()
    start = time.perf_counter()
    compiled()
    first = time.perf_counter() - start
    times = time_interleaved({"eager": eager, "compiled": compiled}, "cpu", spec["repeats"])
    return {"compile_s": first, "graphs": compiled.counter.graphs, **times}


USER_STEPS = 5  # steps of the whole-process ("as a user's run sees it") memory figure


def process_peak_worker(spec: dict) -> dict:
    """A user's run of one path's step: this fresh process, the default allocator (no
    settings), USER_STEPS steps; the whole process's peak resident size (imports included)."""
    step = make_step(spec, spec["impl"])
    for _ in range(USER_STEPS):
        step()
    return {"process_peak_mb": process_peak_rss_bytes() / 2**20}


def run_worker(spec: dict) -> dict:
    """mode "time": both paths, interleaved; mode "mem": one path's peak memory; mode "rss":
    process_peak_worker; mode "efficiency": efficiency_worker."""
    torch.set_num_threads(spec["threads"])
    try:
        if spec["mode"] == "rss":
            return process_peak_worker(spec)
        if spec["mode"] in ("efficiency", "compile"):
            return (efficiency_worker if spec["mode"] == "efficiency" else compile_worker)(spec)
        if spec["mode"] == "mem":
            return {"peak_mb": peak_memory_mb(make_step(spec, spec["impl"]), spec["device"])}
        steps = {}
        for impl in IMPLS:  # a path that runs out of memory is left out (its time is nan)
            try:
                steps[impl] = make_step(spec, impl)
                steps[impl]()  # warm-up
            except torch.cuda.OutOfMemoryError:
                steps.pop(impl, None)
                torch.cuda.empty_cache()
        return time_interleaved(steps, spec["device"], spec["repeats"]) if steps else {}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}


def spawn(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter (clean peak memory)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if spec["mode"] == "mem":  # freed memory leaves the RSS at once (timings keep the defaults)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, str(BENCH), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_case(spec: dict) -> dict:
    """{impl: {"seconds", "peak_mb"}} for both paths."""
    times = spawn(dict(spec, mode="time"))
    out = {}
    for impl in IMPLS:
        mem = spawn(dict(spec, mode="mem", impl=impl))
        out[impl] = {"seconds": times.get(impl, float("nan")),
                     "peak_mb": mem.get("peak_mb", float("nan"))}
    return out
