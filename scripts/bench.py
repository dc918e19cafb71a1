"""Benchmark of the attention paths ("reference" vs "grouped"), not a test.

Dimension legend: B batch, M block length, L max span, H hidden, K heads,
D head dim, V vocabulary.

Reports, for both paths side by side in one run:
  1. one attention layer (B=4, K=8, D=64, M=512; --quick: B=1, M=256),
     forward+backward median time and peak memory, at max span 1024..8192 for
     head spans (a) "learned": 34..72 in every head, as heads learn them on enwik8,
     (b) "short": 32..512, (c) "mixed": short heads and one at the max span,
     (d) "max": all at the max span; the ratio is default (grouped) / reference speed;
  2. a whole training step of a medium model (4 layers, hidden 128, 4 heads,
     block 128, batch 8, short learned spans and one long head per layer):
     tokens/s and peak memory at max span 512 and 4096;
  3. attention multiply-adds per token of each path (attention_flops_per_token);
  4. step efficiency of the medium model (max span 512, Adagrad, adaptive span + cache)
     at learned spans: the step's FLOPs (flops.py forward FLOPs x 3) per second over an
     fp32 matmul rate measured in the same run, for both paths, and peak memory;
     with --compile also torch.compile (compile time, graphs, step time);
  with --device cuda --config enwik8: the enwik8 model (bf16 autocast) tokens/s,
  peak memory and MFU.

Timings: medians, the two paths alternating in one process. Peak memory: one
path per fresh process, over one step after a warm-up step; on CPU the growth of
the kernel's peak resident set size (VmHWM, reset through /proc/self/clear_refs)
over the resident size before the step (glibc is told to return freed memory
at once: MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, malloc_trim), on CUDA
torch.cuda.max_memory_allocated over the allocated memory before the step (scripts/measure.py).

    python scripts/bench.py --quick [--json FILE] [--threads 1] [--device cpu]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flops  # noqa: E402
from adaptive_span import AdaptiveSpan  # noqa: E402
from attention import plan_groups  # noqa: E402
from compile_model import compile_layers  # noqa: E402
from measure import (matmul_seconds, peak_memory_mb, process_peak_rss_bytes, time_interleaved,  # noqa: E402
                     time_interleaved_cpu)
from models import ATTN_IMPLS, ModelConfig, TransformerSeq  # noqa: E402
from optim import AdagradWithGradClip  # noqa: E402

IMPLS = ("reference", "grouped")
PROFILES = ("learned", "short", "mixed", "max")
RAMP = 32
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet)


# ---- spans ---------------------------------------------------------------------
def profile_spans(profile: str, max_span: int, nheads: int) -> list:
    """Head spans (positions with a non-zero mask) of a span profile."""
    if profile == "learned":
        return [34 + (72 - 34) * k // (nheads - 1) for k in range(nheads)]  # 34 .. 72
    if profile == "short":
        return [32 + (512 - 32) * k // (nheads - 1) for k in range(nheads)]  # 32 .. 512
    if profile == "mixed":
        base = [32, 64, 64, 128, 128, 256, 512]
        return (base[:nheads - 1] + [max_span])[-nheads:]
    return [max_span] * nheads


def set_spans(span: AdaptiveSpan, spans: list) -> None:
    """current_val such that head_spans() == spans (z just below an integer)."""
    L = span.attn_span
    vals = [1.0 if s >= L else max(0.0, (s - span.ramp - 0.5) / L) for s in spans]
    with torch.no_grad():
        span.current_val.copy_(torch.tensor(vals).view(-1, 1, 1))


# ---- FLOPs ---------------------------------------------------------------------
def span_module(head_spans: list, max_span: int) -> AdaptiveSpan:
    """A span module whose head_spans() are ``head_spans`` (its windows, trim and cache
    follow from the rules of adaptive_span.py)."""
    span = AdaptiveSpan(max_span, len(head_spans), ramp=RAMP)
    set_spans(span, head_spans)
    return span


def executed_groups(head_spans: list, max_span: int, impl: str, batch: int, block: int,
                    width: int) -> list:
    """[(window, chunk, heads)] the path runs: L' for every head (reference), else the
    groups of attention.plan_groups."""
    span = span_module(head_spans, max_span)
    if impl == "reference":
        return [(span.kept_len(), block, len(head_spans))]
    groups, _ = plan_groups(tuple(span.head_windows()), batch, block, width)
    return [(w, c, len(range(len(head_spans))[h]) if isinstance(h, slice) else len(h))
            for w, c, h in groups]


def attention_flops_per_token(cfg: ModelConfig, head_spans: list, impl: str,
                              block_size: int, batch: int = 8) -> float:
    """Multiply-adds per token of one forward pass of the attention of all layers:
    content logits QK^T, position logits, probs@V and the K/V projections (the
    query and output projections do not depend on the span and are left out).
    ``head_spans``: per layer a list of per-head spans (or one list for every layer)."""
    per_layer = head_spans if isinstance(head_spans[0], list) else [head_spans] * cfg.nlayers
    M, H, D, L = block_size, cfg.hidden_size, cfg.head_dim, cfg.attn_span
    total = 0.0
    for spans in per_layer:
        for W, chunk, heads in executed_groups(spans, L, impl, batch, M, D):
            band = chunk + W  # keys per query of the banded (or dense: chunk = M) product
            total += heads * (band * D + W * D + band * D)  # q.k, q.pe, probs @ V
            total += heads * 2 * (W + M) / M * H * D  # the group's K and V rows, per query
    return total


def model_flops_per_token(cfg: ModelConfig, head_spans: list, impl: str, block_size: int) -> float:
    """FLOPs per token of a training step (forward + backward = 3 x forward, 2 per MAC)."""
    H, I, V = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
    dense = cfg.nlayers * (2 * H * H + (2 * H * I if cfg.has_ff else 0)) + H * V
    return 3 * 2 * (dense + attention_flops_per_token(cfg, head_spans, impl, block_size))


def layer_step(impl: str, max_span: int, profile: str, B: int, M: int, device: str):
    """One attention layer's forward+backward with a full cache of L states."""
    K, D = 8, 64
    H = K * D
    torch.manual_seed(0)
    span = AdaptiveSpan(max_span, K, ramp=RAMP).to(device)
    set_spans(span, profile_spans(profile, max_span, K))
    query = torch.randn(B, M, H, device=device, requires_grad=True)  # (B, M, H)
    h_all = torch.randn(B, max_span + M, H, device=device, requires_grad=True)  # (B, L+M, H)
    w_key = (torch.randn(H, H, device=device) / math.sqrt(H)).requires_grad_()  # (H, H)
    w_val = (torch.randn(H, H, device=device) / math.sqrt(H)).requires_grad_()  # (H, H)
    key_pe = torch.randn(1, D, max_span, device=device, requires_grad=True)  # (1, D, L)
    fn = ATTN_IMPLS[impl]

    def step():
        out = fn(query, h_all, w_key, w_val, key_pe, K, span, None, 0.0, True)  # (B, M, H)
        out.sum().backward()

    return step


def model_step(cfg: ModelConfig, spans: list, B: int, M: int, device: str, bf16: bool,
               compiled: bool = False):
    """A training step: forward, span loss, backward, Adagrad step (the reference's,
    lr 0.07, clip 0.03), span reset."""
    torch.manual_seed(0)
    model = TransformerSeq(cfg).to(device)
    for layer in model.layers:
        set_spans(layer.span, spans)
    counter = compile_layers(model) if compiled else None
    opt = AdagradWithGradClip(model.parameters(), lr=0.07, grad_clip=0.03)
    x = torch.randint(0, cfg.vocab_size, (B, M + 1), device=device)
    state = {"caches": [torch.randn_like(c) for c in model.init_cache(B, device)]}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            nll, caches = model(x[:, :-1], state["caches"], x[:, 1:])  # (B, M)
            loss = nll.mean() + model.span_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for layer in model.layers:  # keep the spans where they were set
            set_spans(layer.span, spans)
        model.refresh_spans()  # as clamp_spans does after every update
        state["caches"] = caches

    step.counter = counter
    return step


def medium_config(max_span: int) -> ModelConfig:
    return ModelConfig(vocab_size=205, hidden_size=128, inner_hidden_size=512, nlayers=4,
                       nheads=4, attn_span=max_span, dropout=0.0, adapt_span=True,
                       adapt_span_cache=True, adapt_span_ramp=RAMP)


def enwik8_config(impl: str) -> ModelConfig:
    return ModelConfig(vocab_size=205, hidden_size=512, inner_hidden_size=2048, nlayers=12,
                       nheads=8, attn_span=8192, dropout=0.0, adapt_span=True,
                       adapt_span_cache=True, adapt_span_ramp=RAMP, attn_impl=impl)


MEDIUM_SPANS = [32, 64, 128, None]  # None: the layer's max span (one long head)
ENWIK8_SPANS = [32, 64, 64, 128, 128, 256, 512, 8192]


def make_step(spec: dict, impl: str):
    if spec["kind"] == "layer":
        return layer_step(impl, spec["max_span"], spec["profile"], spec["B"], spec["M"],
                          spec["device"])
    if spec["kind"] == "model":
        L = spec["max_span"]
        cfg = medium_config(L)
        cfg.attn_impl = impl
        spans = spec.get("spans") or [s or L for s in MEDIUM_SPANS]
        return model_step(cfg, spans, 8, 128, spec["device"], False)
    return model_step(enwik8_config(impl), ENWIK8_SPANS, 8, 512, "cuda", True)  # "enwik8"


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
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
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


# ---- report --------------------------------------------------------------------
def layer_section(args, B: int, M: int, repeats: int) -> list:
    rows = []
    for max_span in args.spans:
        for profile in PROFILES:
            row = {"max_span": max_span, "profile": profile, "B": B, "M": M}
            row.update(measure_case({"kind": "layer", "max_span": max_span, "profile": profile,
                                     "B": B, "M": M, "device": args.device, "repeats": repeats,
                                     "threads": args.threads}))
            row["speedup"] = row["reference"]["seconds"] / row["grouped"]["seconds"]
            print(f"{max_span:>6} {profile:>7} | {row['reference']['seconds'] * 1e3:9.1f} "
                  f"{row['grouped']['seconds'] * 1e3:9.1f} {row['speedup']:6.2f}x | "
                  f"{row['reference']['peak_mb']:8.0f} {row['grouped']['peak_mb']:8.0f}", flush=True)
            rows.append(row)
    return rows


def model_section(args, repeats: int) -> list:
    rows = []
    for max_span in (512, 4096):
        row = {"max_span": max_span, "spans": [s or max_span for s in MEDIUM_SPANS]}
        row.update(measure_case({"kind": "model", "max_span": max_span, "device": args.device,
                                 "repeats": repeats, "threads": args.threads}))
        for impl in IMPLS:
            row[impl]["tokens_per_s"] = 8 * 128 / row[impl]["seconds"]
        row["speedup"] = row["grouped"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
        print(f"{max_span:>6} | {row['reference']['tokens_per_s']:9.0f} "
              f"{row['grouped']['tokens_per_s']:9.0f} {row['speedup']:6.2f}x | "
              f"{row['reference']['peak_mb']:8.0f} {row['grouped']['peak_mb']:8.0f}", flush=True)
        rows.append(row)
    return rows


def flops_section(args, M: int) -> list:
    rows = []
    cases = [(f"layer {p}", ModelConfig(vocab_size=205, hidden_size=512, nlayers=1, nheads=8,
                                        attn_span=L), profile_spans(p, L, 8), M)
             for L in args.spans for p in PROFILES]
    cases += [("medium model", medium_config(L), [s or L for s in MEDIUM_SPANS], 128)
              for L in (512, 4096)]
    cases.append(("enwik8 model", enwik8_config("grouped"), ENWIK8_SPANS, 512))
    for name, cfg, spans, block in cases:
        ref, grp = (attention_flops_per_token(cfg, spans, impl, block) for impl in IMPLS)
        rows.append({"case": name, "max_span": cfg.attn_span, "block": block, "spans": spans,
                     "reference": ref, "grouped": grp})
        print(f"{name:>13} {cfg.attn_span:>6} {block:>4} | {ref / 1e6:9.2f} {grp / 1e6:9.2f} "
              f"{ref / grp:6.2f}x", flush=True)
    return rows


def enwik8_section(args, repeats: int) -> list:
    rows = []
    row = {"config": "enwik8", "spans": ENWIK8_SPANS}
    row.update(measure_case({"kind": "enwik8", "device": "cuda", "repeats": repeats,
                             "threads": args.threads}))
    for impl in IMPLS:
        r = row[impl]
        r["tokens_per_s"] = 8 * 512 / r["seconds"]
        flops = model_flops_per_token(enwik8_config(impl), ENWIK8_SPANS, impl, 512)
        r["mfu"] = r["tokens_per_s"] * flops / H200_BF16_PEAK
        print(f"{impl:>10} | {r['tokens_per_s']:10.0f} tok/s | {r['peak_mb']:9.0f} MB | "
              f"MFU {100 * r['mfu']:5.1f}% (nan: out of memory)", flush=True)
    rows.append(row)
    return rows


def generation_section(args) -> dict:
    """Sampling rate of the enwik8-size model (12 layers, H=512, K=8, FF 2048, L=8192, head
    spans ENWIK8_SPANS in every layer, V=205), batch 1, one token per step after a 512-token
    prompt: the key/value cache (inference.KVCache, generate.py's default) against the full
    recomputation (model(x, caches), generate.py --no-kv-cache). Medians of the two paths
    alternating in this process; the cache's bytes of keys and values."""
    import inference  # only this section needs it
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransformerSeq(enwik8_config("grouped")).to(args.device).eval()
    for layer in model.layers:
        set_spans(layer.span, ENWIK8_SPANS)
    prompt = torch.randint(0, 205, (1, 512), device=args.device)  # (1, P)
    cache = inference.KVCache(model)
    cache.prefill(prompt, 512)
    with torch.no_grad():
        state = list(model(prompt, model.init_cache(1, args.device))[1])  # (1, C, H) per layer
    token = prompt[:, -1:]  # (1, 1)

    def kv_cache():
        cache.step(token[0])  # (1, V)

    @torch.no_grad()
    def recompute():
        state[:] = model(token, state)[1]

    counts = {"kv-cache": 30, "recompute": 2} if args.quick else {"kv-cache": 60, "recompute": 4}
    paths = {"kv-cache": kv_cache, "recompute": recompute}
    steps = {name: (lambda f=f, n=counts[name]: [f() for _ in range(n)]) for name, f in paths.items()}
    wall, cpu = time_interleaved_cpu(steps, args.device, 5 if args.quick else 7)
    rates = {name: counts[name] / t for name, t in wall.items()}
    cpu_rates = {name: counts[name] / t for name, t in cpu.items()}
    print("\n## generation, enwik8-size model (12 layers, H=512, K=8, FF 2048, L=8192, spans "
          f"{ENWIK8_SPANS[0]}..{ENWIK8_SPANS[-1]}), batch 1, one token per step after 512")
    print("      path | tokens/s (wall) | ms/token | tokens/s (this thread's CPU time)")
    for name, rate in rates.items():
        print(f"{name:>10} | {rate:15.1f} | {1e3 / rate:8.1f} | {cpu_rates[name]:8.1f}")
    mib = cache.memory_bytes() / 2**20
    print(f"  kv-cache / recompute (wall): {rates['kv-cache'] / rates['recompute']:.1f}x; keys and "
          f"values held: {mib:.1f} MiB; load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"tokens_per_s": rates, "tokens_per_cpu_s": cpu_rates, "kv_cache_mib": mib}


def efficiency_section(args, repeats: int) -> dict:
    """The medium model at learned spans: step time, FLOPs / matmul rate, peak memory."""
    spans = profile_spans("learned", 512, 4)
    spec = {"kind": "model", "max_span": 512, "spans": spans, "device": "cpu",
            "repeats": max(repeats, 5), "threads": args.threads}
    row = dict(spawn(dict(spec, mode="efficiency")), spans=spans)
    for impl in IMPLS:
        row[impl]["peak_mb"] = spawn(dict(spec, mode="mem", impl=impl))["peak_mb"]
        row[impl]["process_peak_mb"] = spawn(dict(spec, mode="rss", impl=impl))["process_peak_mb"]
    print(f"fp32 matmul rate (512^3, same run): {row['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print("      path |  ms/step |  GFLOP/step | efficiency | step peak | whole-process peak")
    for impl in IMPLS:
        r = row[impl]
        print(f"{impl:>10} | {r['seconds'] * 1e3:8.1f} ms | {r['flops'] / 1e9:6.2f} GFLOP | "
              f"efficiency {r['efficiency']:.2f} | {r['peak_mb']:6.0f} MB | {r['process_peak_mb']:6.0f} MB",
              flush=True)
    print(f"  step peak: growth over one step after a warm-up, freed memory returned at once; whole-process "
          f"peak: a fresh process's ru_maxrss after {USER_STEPS} steps, default allocator (as a user's run)")
    row["speedup"] = row["reference"]["seconds"] / row["grouped"]["seconds"]
    print(f"default/reference speed {row['speedup']:.2f}x")
    if args.compile:
        row["compile"] = c = spawn(dict(spec, mode="compile"))
        print(f"torch.compile (inductor, default path): first step {c['compile_s']:.1f} s "
              f"({c['graphs']} graphs), then {c['compiled'] * 1e3:.1f} ms/step against "
              f"{c['eager'] * 1e3:.1f} eager ({c['eager'] / c['compiled']:.2f}x)", flush=True)
    return row


def cache_build_section(args) -> dict:
    """The token-cache build's peak, apart from training: scripts/cache_memory.py on a
    generated enwik8-format corpus of --cache-mb MB (a fresh process, default allocator)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cache.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("cache_memory.py")), "--generate",
                               "enwik8", "--mb", str(args.cache_mb), "--json", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/cache_memory.py failed:\n{proc.stderr[-3000:]}")
        print(proc.stdout.strip(), flush=True)
        return json.loads(out.read_text())


def parse_args(argv=None):
    from flags import HelpFormatter  # the help layout of main.py: every flag with its default
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=1, M=256 layer cases, fewer repeats")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to time")
    p.add_argument("--config", choices=["none", "enwik8"], default="none",
                   help="with --device cuda: also time the enwik8 model (bf16 autocast)")
    p.add_argument("--spans", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="maximum spans L to time")
    p.add_argument("--skip-layer", action="store_true", help="skip the one-layer cases")
    p.add_argument("--skip-model", action="store_true", help="skip the medium-model training step")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on a CPU)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--cache-mb", type=float, default=16.0,
                   help="MB of generated enwik8 text whose token-cache build is measured (0: skip; "
                        "scripts/cache_memory.py --mb 100 for enwik8's size)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--generation", action="store_true",
                   help="also time sampling from the enwik8-size model (KV cache vs recompute); on in --quick")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    B, M, repeats = (1, 256, 3) if args.quick else (4, 512, 5)
    mem = "cuda max_memory_allocated" if args.device == "cuda" else "peak RSS growth (VmHWM)"
    report = {"device": args.device, "threads": args.threads, "quick": args.quick,
              "torch": torch.__version__, "memory": mem}
    print(f"# device {args.device}, {args.threads} thread(s), torch {torch.__version__}, "
          f"peak memory = {mem}")
    if not args.skip_layer:
        print(f"\n## one attention layer, forward+backward (B={B}, K=8, D=64, M={M}, cache L)")
        print("  span   heads |    ref ms   grp ms  default/ref |   ref MB   grp MB")
        report["layer"] = layer_section(args, B, M, repeats)
    if not args.skip_model:
        print("\n## medium model training step (4 layers, H=128, K=4, M=128, B=8)")
        print("  span |  ref tok/s grp tok/s speedup |   ref MB   grp MB")
        report["model"] = model_section(args, repeats)
    print(f"\n## step efficiency: medium model, max span 512, learned spans "
          f"{profile_spans('learned', 512, 4)} in every layer, Adagrad, adaptive span + cache")
    report["efficiency"] = efficiency_section(args, repeats)
    print("\n## attention multiply-adds per token (millions, forward)")
    print("         case   span    M |       ref       grp  ratio")
    report["flops"] = flops_section(args, M)
    if args.device == "cuda" and args.config == "enwik8":
        print("\n## enwik8 model training step (12 layers, H=512, K=8, L=8192, M=512, B=8, bf16)")
        report["enwik8"] = enwik8_section(args, repeats)
    if args.cache_mb > 0:
        print("\n## token-cache build (the first run on a dataset, before training), enwik8 format")
        report["cache_build"] = cache_build_section(args)
    if args.generation or args.quick:
        report["generation"] = generation_section(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
