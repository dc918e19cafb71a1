"""Is this machine ready for a run? A few minutes of checks, one READY / NOT READY line at the end.

    bash scripts/smoke.sh           # the GPU node a run will use (about 5 minutes on one node)
    bash scripts/smoke.sh --cpu     # CPU only (what CI runs; well under a minute on 2 idle cores)

It reports the devices and the thread choice (threads.py), then:
- speed: training steps (forward, span loss, backward, Adagrad) of a fixed shape, timed in this
  process: on a GPU the published enwik8 12-layer shape (H 512, 8 heads, span 8192, block 512,
  batch 8 = the published 64 over 8 GPUs) in bf16 autocast, without and with ``torch.compile``
  (compile_model.compile_layers); with ``--cpu`` the README quick start's shape in fp32 and no
  compile (an inductor compile on CPU takes longer than this whole check; tests/test_compile.py
  covers it). Each prints tokens/s, peak memory, model FLOPs per token and MFU (3x the forward
  FLOPs of flops.py per token, against the GPU's dense bf16 peak, or this CPU's measured fp32
  matmul rate), and the attention planner's plan of the first layer;
- main.py: a tiny run of 2 iterations, the same run stopped after 1 and resumed, and the same
  final losses from both (the checkpoint round trip);
- two ranks through scripts/launch_ranks.py (NCCL over two GPUs; gloo on CPU where fewer).
docs/performance.md says what to compare the figures with.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threads import apply_threads  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets;
# SMOKE_PEAK_TFLOPS overrides (another GPU, a clock-limited part).
# The first key contained in the device's name is used.
GPU_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
            "H100": 756e12, "A100": 312e12, "L40S": 362e12}
TINY = ["--nlayers", "2", "--hid-sz", "32", "--inner-hid-sz", "64", "--nheads", "2", "--attn-span", "64",
        "--block-sz", "16", "--batch-sz", "8", "--dropout", "0.1", "--adapt-span", "--adapt-span-loss",
        "0.01", "--adapt-span-cache", "--lr-warmup", "10", "--nbatches", "5", "--seed", "3"]
STEPS_LINE = re.compile(r"^steps: (\d+) train: (\S+) val: (\S+) ms/batch", re.M)


def devices(torch, cpu_only: bool) -> list:
    lines = [f"torch {torch.__version__}, python {sys.version.split()[0]}, "
             f"{len(os.sched_getaffinity(0))} CPU cores for this process"]
    if cpu_only:
        return lines + ["CUDA: not used (--cpu)"]
    if not torch.cuda.is_available():
        return lines + ["CUDA: no device visible (CUDA_VISIBLE_DEVICES, driver, or a CPU build of torch)"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    nccl = torch.distributed.is_nccl_available()
    lines.append(f"CUDA {torch.version.cuda}, bf16: {torch.cuda.is_bf16_supported()}, NCCL: "
                 f"{'version ' + '.'.join(map(str, torch.cuda.nccl.version())) if nccl else 'not available'}")
    return lines


def peak_flops(torch, device: str):
    """(peak FLOP/s, what it is) of the device that runs the speed check."""
    if os.environ.get("SMOKE_PEAK_TFLOPS"):
        return float(os.environ["SMOKE_PEAK_TFLOPS"]) * 1e12, "SMOKE_PEAK_TFLOPS"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        match = next((k for k in GPU_PEAK if k in name), None)  # the most specific key first
        return (GPU_PEAK[match], f"{match} dense bf16 peak") if match else (None, f"no peak known for {name}")
    from measure import matmul_seconds, time_interleaved
    step, flop = matmul_seconds(1024)
    return flop / time_interleaved({"mm": step}, "cpu", 7)["mm"], "this CPU's measured fp32 matmul rate"


def train_step(torch, model, batch: int, block: int, device: str, bf16: bool):
    """One training step of ``model`` on random tokens (forward, span loss, backward, Adagrad)."""
    from measure import training_step
    opt = torch.optim.Adagrad(model.parameters(), lr=0.07)
    x = torch.randint(0, model.cfg.vocab_size, (batch, block + 1), device=device)  # (B, M + 1)
    return training_step(model, opt, x, model.init_cache(batch, device), device, bf16)


def plan_text(model, batch: int, block: int) -> str:
    plan = model.layers[0].attn.attn.plan(batch, block, model.cfg.attn_span)  # attention.attention_plan
    if plan is None:
        return "plan: none (the reference path)"
    keep, groups = plan[0], plan[1]
    parts = [f"window {w}, chunk {c}, heads {h.start}-{h.stop - 1}" if isinstance(h, slice)
             else f"window {w}, chunk {c}, heads {','.join(map(str, h))}" for w, c, h in groups]
    return f"plan of layer 0: keeps {keep} of {model.cfg.attn_span} cached positions; " + "; ".join(parts)


def speed(torch, device: str, compiled: bool, peak) -> list:
    """Lines: tokens/s, peak memory, FLOPs, MFU and the plan of the fixed shape's steps."""
    import flops
    from measure import peak_memory_mb, time_interleaved
    from models import ModelConfig, TransformerSeq
    gpu = device == "cuda"
    if gpu:  # scripts/enwik8.sh's model, one GPU's share of the batch
        cfg = ModelConfig(vocab_size=205, hidden_size=512, inner_hidden_size=2048, nlayers=12, nheads=8,
                          attn_span=8192, dropout=0.3, adapt_span=True, adapt_span_loss=5e-7,
                          adapt_span_cache=True)
        batch, block, what = 8, 512, "enwik8 12 layers, batch 8, block 512, bf16"
    else:  # the README quick start's model
        cfg = ModelConfig(vocab_size=256, hidden_size=128, inner_hidden_size=512, nlayers=3, nheads=4,
                          attn_span=256, dropout=0.1, adapt_span=True, adapt_span_loss=2e-6,
                          adapt_span_cache=True)
        batch, block, what = 16, 64, "quick start, batch 16, block 64, fp32"
    torch.manual_seed(0)
    model = TransformerSeq(cfg).to(device)
    if compiled:
        from compile_model import compile_layers
        compile_layers(model)
    step = train_step(torch, model, batch, block, device, bf16=gpu)
    start = time.perf_counter()
    step()  # the compile, where there is one
    first = time.perf_counter() - start
    mem = peak_memory_mb(step, device)
    sec = time_interleaved({"step": step}, device, 10 if gpu else 5)["step"]
    tok_s = batch * block / sec
    fwd = flops.flops_per_token(model).model
    mfu = f"{100 * 3 * fwd * tok_s / peak[0]:.1f}% of {peak[1]}" if peak[0] else f"n/a ({peak[1]})"
    label = f"speed ({what}{', compiled' if compiled else ''})"
    return [f"{label}: {tok_s:,.0f} tokens/s, {1000 * sec:.1f} ms/step (first step {first:.1f} s), "
            f"peak memory {mem:,.0f} MB, {flops.format_flops(fwd)} forward FLOPs/token, MFU {mfu}",
            plan_text(model, batch, block)]


def run_main(args: list, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def last_losses(res: subprocess.CompletedProcess) -> tuple:
    found = STEPS_LINE.findall(res.stdout)
    if res.returncode != 0 or not found:
        tail = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit status {res.returncode}: {tail}")
    return found[-1]


def round_trip(tmp: Path, data: Path, device_flags: list, env: dict) -> str:
    """Two iterations in one run, and one then a resume to two: the same final losses."""
    base = ["main.py", "--data", str(data), *TINY, *device_flags]
    whole = last_losses(run_main(base + ["--niter", "2", "--checkpoint", str(tmp / "a.pt")], env, 300))
    last_losses(run_main(base + ["--niter", "1", "--checkpoint", str(tmp / "b.pt")], env, 300))
    resumed = last_losses(run_main(base + ["--niter", "2", "--checkpoint", str(tmp / "b.pt")], env, 300))
    if resumed != whole:
        raise RuntimeError(f"resumed run ended at {resumed}, the uninterrupted one at {whole}")
    return f"checkpoint round trip: resumed run = uninterrupted run (step {whole[0]}, train {whole[1]}, val {whole[2]})"


def two_ranks(tmp: Path, data: Path, device_flags: list, env: dict) -> str:
    launch = ["scripts/launch_ranks.py", "--standalone", "--nproc_per_node=2", "main.py", "--data", str(data),
              *TINY, *device_flags, "--niter", "1", "--checkpoint", str(tmp / "r.pt"), "--distributed"]
    res = run_main(launch, env, 300)
    step, train, val = last_losses(res)
    if "ranks: 2" not in res.stdout:
        raise RuntimeError("main.py did not report 2 ranks")
    backend = "NCCL" if "--device" in device_flags and "cuda" in device_flags else "gloo"
    return f"two ranks ({backend}, scripts/launch_ranks.py): step {step}, train {train}, val {val}"


def check(results: list, name: str, fn, *args) -> None:
    """Run one check; keep (name, passed) and print its lines or its one failure line."""
    try:
        out = fn(*args)
        for line in out if isinstance(out, list) else [out]:
            print(line, flush=True)
        results.append((name, True))
    except Exception as err:  # every failure is reported, the other checks still run
        print(f"FAILED {name}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}",
              flush=True)
        results.append((name, False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU only: a small fp32 shape, no compile, gloo ranks")
    args = p.parse_args(argv)
    start = time.perf_counter()
    print(apply_threads(0, 1), flush=True)
    import torch
    for line in devices(torch, args.cpu):
        print(line, flush=True)
    gpus = 0 if args.cpu or not torch.cuda.is_available() else torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    results = []
    if not args.cpu and not gpus:
        results.append(("CUDA device", False))
    peak = peak_flops(torch, device)
    check(results, "speed", speed, torch, device, False, peak)
    if gpus:
        check(results, "speed with torch.compile", speed, torch, device, True, peak)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not gpus:
        env["OMP_NUM_THREADS"] = "1"  # two ranks on few cores: one thread each
    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        tmp = Path(tmp)
        data = tmp / "code.txt"  # this repository's source as text, as in the README quick start
        data.write_bytes(b"".join(f.read_bytes() for f in sorted(ROOT.glob("*.py"))))
        env["ADAPTIVE_SPAN_CACHE"] = str(tmp / "cache")
        flags = ["--device", "cuda", "--amp", "bf16"] if gpus else ["--device", "cpu"]
        check(results, "checkpoint round trip", round_trip, tmp, data, flags, env)
        rank_flags = ["--device", "cuda"] if gpus >= 2 else ["--device", "cpu"]
        if gpus == 1:
            print("one GPU: the two ranks run on CPU (gloo); NCCL is checked on a node with 2 or more")
        check(results, "two ranks", two_ranks, tmp, data, rank_flags, env)
    failed = [name for name, ok in results if not ok]
    where = f"{gpus} GPU(s)" if gpus else "CPU"
    took = time.perf_counter() - start
    if failed:
        print(f"smoke: NOT READY ({where}, {took:.0f} s): failed: {', '.join(failed)}")
        return 1
    print(f"smoke: READY ({where}, {took:.0f} s): {len(results)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
