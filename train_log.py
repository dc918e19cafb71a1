"""What a training run reports: one greppable line per iteration on rank 0, the history kept
in the checkpoint, TensorBoard scalars (and the spans' figure), and, while an iteration
runs, tqdm's bar in a terminal or a plain progress line when stdout is not one."""
import math
import sys
import time

import expire_span
import flops
import plots  # matplotlib is imported lazily, only for the spans image
from evaluation import to_unit
from utils import DistInfo, MetricsLog

PROGRESS_EVERY_S = 60.0  # a plain progress line at least this often when stdout is not a terminal
SLOW_ITERATION_S = 600.0  # on a CPU, warn when the first iteration would take longer than this


def log_to(dist: DistInfo):
    return (lambda msg: print(msg, flush=True)) if dist.is_main else (lambda msg: None)


def span_figures(state):
    """The spans' figures over the layers (the log line's) and per layer (TensorBoard's), and
    the FLOPs per token: of adaptive span, or of expire span's training memories (with the
    memory length, ``mem``)."""
    model = state.model
    if not model.cfg.expire_span:
        return model.span_stats(), model.layer_span_stats(), flops.flops_per_token(model)
    layers = expire_span.memory_stats(state.trainer.train_cache)
    cost = flops.flops_per_token(model, [s["mem"] for s in layers], state.settings.train.block_size)
    return expire_span.summary(layers), layers, cost


def iteration_line(state, train_nll: float, val_nll: float, ms: float, stats: dict, cost,
                   layers=()) -> str:
    unit = state.settings.data.unit
    line = (f"steps: {state.step} train: {to_unit(train_nll, unit):.3f}{unit} "
            f"val: {to_unit(val_nll, unit):.3f}{unit} ms/batch: {ms:.1f}")
    if stats:
        line += f" span_avg: {stats['span_avg']:.1f} span_max: {stats['span_max']:.0f}"
    if "mem_max" in stats:  # expire span: each layer's memory length
        line += " mem: " + "/".join(str(s["mem"]) for s in layers)
    line += " " + cost.log_text()
    if state.trainer.nonfinite_total:
        line += f" nonfinite_skipped: {state.trainer.nonfinite_total}"
    return line


def log_iteration(state, train_nll: float, val_nll: float, ms: float, metrics: MetricsLog, log,
                  grad_norm: float = math.nan) -> None:
    """The iteration's line, its entry in the history and its TensorBoard figures."""
    model, unit, steps, history = state.model, state.settings.data.unit, state.step, state.history
    stats, layers, cost = span_figures(state)  # cost: forward FLOPs per token at the current spans
    log(iteration_line(state, train_nll, val_nll, ms, stats, cost, layers))
    history.setdefault("step", []).append(steps)
    history.setdefault(f"train_{unit}", []).append(to_unit(train_nll, unit))
    history.setdefault(f"val_{unit}", []).append(to_unit(val_nll, unit))
    for key, value in stats.items():
        history.setdefault(key, []).append(value)
    tokens = state.settings.train.batch_size * state.settings.train.block_size
    metrics.scalars(steps, {f"train/{unit}": to_unit(train_nll, unit), f"val/{unit}": to_unit(val_nll, unit),
                            "train/loss": train_nll, "val/loss": val_nll, "ms_per_batch": ms,
                            "lr": state.optimizer.param_groups[0]["lr"],
                            "tokens_per_s": tokens / max(ms, 1e-9) * 1000,
                            **{f"span/{k}": v for k, v in stats.items()},
                            "train/grad_norm": grad_norm, **cost.metrics(),
                            **{f"span_{kind}/layer_{l:02d}": value
                               for l, layer in enumerate(layers)
                               for kind, value in layer.items()},
                            **({f"span_head/l{l:02d}h{h:02d}": float(span)  # each head, for the study
                                for l, layer in enumerate(model.head_spans()) for h, span in enumerate(layer)}
                               if stats and not model.cfg.expire_span else {})})
    if model.cfg.expire_span:
        log_memory(state, metrics, steps)
        return
    metrics.histogram(steps, "span/heads", [s for layer in model.head_spans() for s in layer])
    if stats and metrics.writer is not None and len(history["step"]) % 10 == 1:  # first, then every 10th
        image = plots.spans_image(model.head_spans(), model.cfg.attn_span)  # None without matplotlib
        if image is not None:
            metrics.image(steps, "span/heads_figure", image)


def log_memory(state, metrics: MetricsLog, steps: int) -> None:
    """Expire span: where the kept memories of stream 0 sit after the last training block (a
    histogram of their distances, all layers; the first, then every 10th iteration, a figure)."""
    memories = [expire_span.unpack(m) for m in state.trainer.train_cache]
    ages = [m[2][0].tolist() for m in memories]  # per layer: distances to the next query
    metrics.histogram(steps, "expire/memory_ages", [a for layer in ages for a in layer])
    if metrics.writer is not None and len(state.history["step"]) % 10 == 1:
        spans = [m[1][0].tolist() for m in memories]
        image = plots.memory_image(ages, spans, state.model.cfg.attn_lim, state.settings.train.block_size)
        if image is not None:
            metrics.image(steps, "expire/memory_figure", image)


class Progress:
    """What a log file gets while an iteration runs (a terminal has tqdm's bar): a line
    every PROGRESS_EVERY_S seconds when stdout is not a terminal, and one warning on a CPU
    when the first step shows that the iteration would take more than SLOW_ITERATION_S."""

    def __init__(self, nbatches: int, dist: DistInfo, log):
        self.log, self.nb = log, nbatches
        self.plain = dist.is_main and not sys.stdout.isatty()
        self.check_speed = dist.device.type == "cpu"
        self.last = time.time()

    def step(self, trainer, iteration: int, start: float, steps_run: int) -> None:
        now = time.time()
        per_step = (now - start) / steps_run  # s
        left = (self.nb - trainer.iter_step) * per_step  # s to the end of this iteration
        if self.check_speed:
            self.check_speed = False
            if left + per_step > SLOW_ITERATION_S:
                self.log(f"warning: training on a CPU: the first step took {per_step:.1f} s, so this "
                         f"iteration ({self.nb} steps) ends in about {format_duration(left)}; the "
                         "published configurations (scripts/*.sh) are meant for GPUs")
        if self.plain and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.log(f"progress: iteration {iteration} step {trainer.iter_step}/{self.nb} (step {trainer.step} "
                     f"overall), {per_step * 1000:.0f} ms/step, the iteration ends in about {format_duration(left)}")


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
