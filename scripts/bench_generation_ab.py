"""Generation A/B: ``KVCache.step`` of another checkout (``--old``, e.g. ``git worktree add
/tmp/old d87466e``) against this one (or ``--new``), both loaded into this process, on the
enwik8-size model of ``bench.py --generation`` (12 layers, H=512, K=8, FF 2048, L=8192, head
spans 32..8192 in every layer, V=205), batch 1, one token per step after a 512-token prompt,
the same weights.

Rounds of ``--tokens`` steps alternate between the two (order flipped every round); printed:
the medians of this process's CPU time per token (``time.process_time``, which other jobs on
the machine inflate far less than wall time) and the largest log-probability difference of one
step, then the load average.

    OMP_NUM_THREADS=1 python scripts/bench_generation_ab.py --old /tmp/old [--rounds 21]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPANS = [32, 64, 64, 128, 128, 256, 512, 8192]  # bench_cases.ENWIK8_SPANS (not imported: two trees)


def load_tree(root: Path) -> dict:
    """``models`` and ``inference`` of the checkout ``root``, imported and then taken out of
    sys.modules (with every module of that checkout), so that the other one imports afresh."""
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    import inference  # noqa: F401
    import models  # noqa: F401
    mods = {"models": sys.modules["models"], "inference": sys.modules["inference"]}
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(root)):
            del sys.modules[name]
    sys.path.remove(str(root))
    return mods


def build(mods: dict, state: dict = None):
    """The enwik8-size model of ``mods`` in eval mode: SPANS set, or the weights ``state``."""
    cfg = mods["models"].ModelConfig(vocab_size=205, hidden_size=512, inner_hidden_size=2048, nlayers=12,
                                     nheads=8, attn_span=8192, dropout=0.0, adapt_span=True,
                                     adapt_span_cache=True, adapt_span_ramp=32, attn_impl="grouped")
    torch.manual_seed(0)
    model = mods["models"].TransformerSeq(cfg).eval()
    if state is not None:
        model.load_state_dict(state)
        return model
    vals = [1.0 if s >= 8192 else max(0.0, (s - 32 - 0.5) / 8192) for s in SPANS]  # bench_cases.set_spans
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.attn.adaptive_span.current_val.copy_(torch.tensor(vals).view(-1, 1, 1))
    if hasattr(model, "refresh_spans"):
        model.refresh_spans()
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other checkout's folder")
    p.add_argument("--new", type=Path, default=ROOT, help="the checkout compared with it")
    p.add_argument("--tokens", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=21, help="rounds per side")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    trees = {"old": load_tree(args.old.resolve()), "new": load_tree(args.new.resolve())}
    new = build(trees["new"])
    models = {"old": build(trees["old"], new.state_dict()), "new": new}
    prompt = torch.randint(0, 205, (1, 512), generator=torch.Generator().manual_seed(1))  # (1, P)
    caches = {name: trees[name]["inference"].KVCache(models[name]) for name in models}
    for cache in caches.values():
        cache.prefill(prompt, 512)
    token = prompt[0, -1:]  # (1,)
    diff = (caches["old"].step(token) - caches["new"].step(token)).abs().max().item()
    cpu = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            start = time.process_time()
            for _ in range(args.tokens):
                caches[name].step(token)
            cpu[name].append((time.process_time() - start) / args.tokens)
    med = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"max |old - new| log-probability after one step: {diff:.1e}")
    for name in ("old", "new"):
        print(f"{name:>4}: {1e3 * med[name]:6.2f} ms/token CPU, {1 / med[name]:5.1f} tokens per CPU second")
    print(f"new / old CPU time per token: {med['new'] / med['old']:.3f}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
