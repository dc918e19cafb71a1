"""Draw what the model learned: every head's span, or the FLOPs per step of a run.

    python scripts/plot_spans.py CHECKPOINT [-o spans.png] [--ramp R]
    python scripts/plot_spans.py --flops LOGDIR [-o flops.png]

CHECKPOINT is one of ours or a reference checkpoint. The span of a head is the number
of positions where its mask is non-zero (``AdaptiveSpan.head_spans``), from
``layers.{l}.attn.attn.adaptive_span._mask.current_val`` (K, 1, 1) with L the length
of ``mask_template``; R is the checkpoint's ramp (ours) or 32 (reference), unless
--ramp is given. A model without adaptive span attends over L in every head.
The spans are also printed, one layer per line.

LOGDIR is a TensorBoard folder of main.py (``<checkpoint>.logs`` by default); the
figure is its ``metrics.jsonl``'s forward FLOPs per token against the step: the
attention at the current spans, at a fixed maximum span, and the whole model.

Needs matplotlib (pip install -r requirements-viz.txt).
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint as ckpt_io  # noqa: E402
from adaptive_span import AdaptiveSpan  # noqa: E402
import plots  # noqa: E402
from train_state import model_state  # noqa: E402
from utils import ConfigError  # noqa: E402

SPAN_KEY = re.compile(r"^layers\.(\d+)\.attn\.attn\.adaptive_span\._mask\.current_val$")
QUERY_KEY = re.compile(r"^layers\.(\d+)\.attn\.proj_query\.weight$")
FLOPS_SERIES = {"flops/attn_flops": "attention, learned spans",
                "flops/attn_flops_max": "attention, fixed max span",
                "flops/model_flops": "whole model, learned spans"}


def checkpoint_spans(ckpt: dict, ramp: Optional[int] = None) -> Tuple[List[List[int]], int]:
    """Per layer, per head spans, and the max span L, of a loaded checkpoint."""
    state = model_state(ckpt)
    if ramp is None:
        ramp = 32 if ckpt_io.is_reference(ckpt) else ckpt["config"]["model"]["adapt_span_ramp"]
    layers = sorted((int(m.group(1)), key) for key in state for m in [SPAN_KEY.match(key)] if m)
    if not layers:  # fixed span: L in every head
        L = state["key_pe"].shape[-1]
        nheads = state["layers.0.attn.proj_query.weight"].shape[0] // state["key_pe"].shape[1]
        nlayers = sum(1 for key in state if QUERY_KEY.match(key))
        return [[L] * nheads for _ in range(nlayers)], L
    spans = []
    for _, key in layers:
        L = state[key.replace("current_val", "mask_template")].numel()
        values = state[key].detach().float()  # (K, 1, 1)
        span = AdaptiveSpan(L, values.numel(), ramp=ramp)
        with torch.no_grad():
            span.current_val.copy_(values)
        spans.append(span.head_spans())
    return spans, L


def plot_checkpoint(path: Path, out: Path, ramp: Optional[int]) -> List[List[int]]:
    ckpt = ckpt_io.load_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"no checkpoint at {path}")
    spans, L = checkpoint_spans(ckpt, ramp)
    flat = [s for layer in spans for s in layer]
    title = f"{path.parent.name}/{path.name}: spans of {len(flat)} heads, mean {sum(flat) / len(flat):.0f}, max {max(flat)}"
    plots.save(plots.spans_plot(spans, L, title), out)
    for layer, heads in enumerate(spans):
        print(f"layer {layer}: {' '.join(str(s) for s in heads)}")
    return spans


def read_metrics(logdir: Path) -> List[dict]:
    path = logdir / "metrics.jsonl" if logdir.is_dir() else logdir
    if not path.is_file():
        raise ConfigError(f"--flops {logdir}: no metrics.jsonl (main.py writes it in <checkpoint>.logs)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_flops(logdir: Path, out: Path) -> None:
    records = [r for r in read_metrics(logdir) if "flops/attn_flops" in r]
    if not records:
        raise ConfigError(f"--flops {logdir}: metrics.jsonl has no FLOPs records")
    records.sort(key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    series = {label: [r[key] for r in records] for key, label in FLOPS_SERIES.items()
              if all(key in r for r in records)}
    if len(series) == len(FLOPS_SERIES):  # the same model with every head at the max span
        series["whole model, fixed max span"] = [r["flops/model_flops"] - r["flops/attn_flops"]
                                                 + r["flops/attn_flops_max"] for r in records]
    plots.save(plots.flops_plot(steps, series), out)
    last = records[-1]
    print(f"step {last['step']}: " + ", ".join(f"{FLOPS_SERIES[k]} {last[k]:.4g}" for k in FLOPS_SERIES
                                               if k in last))


def build_parser() -> argparse.ArgumentParser:
    from flags import HelpFormatter  # the help layout of main.py: every flag with its default
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="checkpoint (ours or the reference's)")
    p.add_argument("--flops", metavar="LOGDIR", help="draw the FLOPs per step of a run instead")
    p.add_argument("-o", "--output", help="PNG file (default: <checkpoint stem>_spans.png or flops.png)")
    p.add_argument("--ramp", type=int, default=None, help="ramp R (default: the checkpoint's, or 32)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if bool(args.checkpoint) == bool(args.flops):
            raise ConfigError("give either a CHECKPOINT or --flops LOGDIR")
        if args.flops:
            out = Path(args.output or "flops.png")
            plot_flops(Path(args.flops), out)
        else:
            out = Path(args.output or Path(args.checkpoint).stem + "_spans.png")
            plot_checkpoint(Path(args.checkpoint), out, args.ramp)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err}; install it with: pip install -r requirements-viz.txt", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
