"""The report sections of scripts/bench.py: each measures (through bench_workers.spawn or in
this process), prints its lines and returns its figures for --json.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cases import (ENWIK8_SPANS, H200_BF16_PEAK, IMPLS, MEDIUM_SPANS, PROFILES,  # noqa: E402
                         attention_flops_per_token, enwik8_config, medium_config, model_flops_per_token,
                         profile_spans)
from bench_workers import USER_STEPS, measure_case, spawn  # noqa: E402
from models import ModelConfig  # noqa: E402

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
