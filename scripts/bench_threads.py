"""Milliseconds per training step of the README quick start's model with 1 and with 2 (or
--threads) torch threads, on idle cores and with other processes keeping cores busy.

    python scripts/bench_threads.py [--busy 0 1 2] [--threads 1 2] [--repeats 15]

For each entry of --busy this script starts that many CPU-burning processes of its own
(plain Python loops, stopped before the next entry), then times training steps (forward,
span loss, backward, Adam) of the quick start's shape (3 layers, H 128, inner 512, 4 heads,
span 256, block 64, batch 16, bytes), the thread counts alternating within every repeat
(measure.time_interleaved_cpu: medians of wall and of CPU time). It prints one line per
(busy, threads) and the uptime before it starts. threads.py's rule is chosen by these
figures (docs/performance.md).
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import time_interleaved_cpu, training_step  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402

BURN = "while True: pass"


def quick_start_step():
    """One training step of the quick start's model (its flags, README 'Quick start')."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, hidden_size=128, inner_hidden_size=512, nlayers=3, nheads=4,
                      attn_span=256, dropout=0.1, adapt_span=True, adapt_span_loss=2e-6,
                      adapt_span_cache=True)
    model = TransformerSeq(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    x = torch.randint(0, 256, (16, 65))  # (B, M + 1)
    return training_step(model, opt, x, model.init_cache(16))


def with_threads(step, n: int):
    def run():
        torch.set_num_threads(n)
        step()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="CPU burners per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts compared")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per thread count")
    args = p.parse_args(argv)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, quick-start model, ms/step (median wall; median CPU of the main thread)")
    step = quick_start_step()
    for busy in args.busy:
        burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            steps = {n: with_threads(step, n) for n in args.threads}
            for run in steps.values():  # warm-up of every thread pool
                run()
            wall, cpu = time_interleaved_cpu(steps, "cpu", args.repeats)
        finally:
            for proc in burners:
                proc.kill()
                proc.wait()
        for n in args.threads:
            print(f"busy cores: {busy}  threads: {n}  {1000 * wall[n]:8.1f} ms/step  "
                  f"(cpu {1000 * cpu[n]:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
