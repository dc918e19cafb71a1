"""The generation section of scripts/bench.py: sampling from the enwik8-size model with the
key/value cache against the full recomputation.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cases import ENWIK8_SPANS, enwik8_config, set_spans  # noqa: E402
from measure import time_interleaved_cpu  # noqa: E402
from models import TransformerSeq  # noqa: E402


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
