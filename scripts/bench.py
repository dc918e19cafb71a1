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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cases import profile_spans  # noqa: E402
from bench_generation import generation_section  # noqa: E402
from bench_sections import (cache_build_section, efficiency_section, enwik8_section,  # noqa: E402
                            flops_section, layer_section, model_section)
from bench_workers import run_worker  # noqa: E402


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
