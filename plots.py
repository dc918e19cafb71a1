"""Figures of the learned spans and of the FLOPs per step (matplotlib, imported lazily).

matplotlib is optional (requirements-viz.txt): importing this module never needs
it; ``spans_image`` returns None without it, the other functions raise ImportError.
Figures are drawn on an Agg canvas without pyplot, so no global state is touched.

Spans: ``head_spans[l][k]`` is the span of head k of layer l (positions with a
non-zero mask, ramp included), drawn as bars grouped by layer on a log scale,
with the maximum span L marked.
"""
from typing import Dict, List, Optional, Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def spans_plot(head_spans: List[List[int]], max_span: int, title: str = ""):
    """A matplotlib Figure of every head's span, layers along x, heads grouped."""
    nlayers, nheads = len(head_spans), max(len(s) for s in head_spans)
    width = min(24.0, max(6.0, 0.12 * nlayers * (nheads + 1) + 2.0))
    fig = _figure(width, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{k % 10}" for k in range(nheads)]
    for layer, spans in enumerate(head_spans):
        x = [layer * (nheads + 1) + k for k in range(len(spans))]
        heights = [max(s, 1) for s in spans]
        ax.bar(x, heights, width=0.9, color=colors[:len(spans)], bottom=0)
    ax.axhline(max_span, color="black", linestyle="--", linewidth=1)
    ax.text(0, max_span * 1.08, f"max span L = {max_span}", fontsize=8, va="bottom")
    ax.set_yscale("log")
    ax.set_ylim(1, max_span * 2)
    centers = [layer * (nheads + 1) + (nheads - 1) / 2 for layer in range(nlayers)]
    step = max(1, nlayers // 24)
    ax.set_xticks(centers[::step])
    ax.set_xticklabels([str(layer) for layer in range(nlayers)][::step])
    ax.set_xlim(-1, nlayers * (nheads + 1) - 1)
    ax.set_xlabel(f"layer ({nheads} heads each, left to right)")
    ax.set_ylabel("span (tokens, log scale)")
    flat = [s for spans in head_spans for s in spans]
    ax.set_title(title or f"learned spans: mean {np.mean(flat):.0f}, max {max(flat)}")
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """RGB pixels (H, W, 3) uint8 of a figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def spans_figure(head_spans: List[List[int]], max_span: int) -> np.ndarray:
    """The spans figure as an HWC uint8 image (for TensorBoard)."""
    return figure_to_array(spans_plot(head_spans, max_span))


def spans_image(head_spans: List[List[int]], max_span: int) -> Optional[np.ndarray]:
    """``spans_figure``, or None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return spans_figure(head_spans, max_span)


def memory_plot(ages: List[List[float]], spans: List[List[float]], attn_lim: int, block: int):
    """Expire span: where the kept memories of one stream sit after the last block, per layer
    (``ages[l]``: their distances to the next query, ``spans[l]``: their spans, the colour)."""
    fig = _figure(8.0, max(2.5, 0.35 * len(ages) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    for layer, (a, e) in enumerate(zip(ages, spans)):
        points = ax.scatter(a, [layer] * len(a), c=e, s=6, cmap="viridis", vmin=0, vmax=attn_lim)
    fig.colorbar(points, ax=ax, label="expire span e")
    ax.axvline(block, color="grey", linestyle=":", linewidth=1)
    ax.axvline(attn_lim, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(0.8, attn_lim * 2)
    ax.set_xlabel("distance to the next query (dotted: block, dashed: --attn-lim)")
    ax.set_ylabel("layer")
    ax.set_title("kept memories of stream 0")
    return fig


def memory_image(ages: List[List[float]], spans: List[List[float]], attn_lim: int,
                 block: int) -> Optional[np.ndarray]:
    """``memory_plot`` as an HWC uint8 image, or None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return figure_to_array(memory_plot(ages, spans, attn_lim, block))


def flops_plot(steps: Sequence[int], series: Dict[str, Sequence[float]], title: str = ""):
    """A matplotlib Figure of FLOPs per token against the training step (log scale)."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in series.items():
        ax.plot(steps, values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("forward FLOPs per token")
    ax.set_title(title or "FLOPs per token as the spans are learned")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(str(path), format="png")


def points_plot(series: Dict[str, Sequence[tuple]], xlabel: str, ylabel: str, title: str):
    """A Figure of labelled points ``(x, y, label)`` joined per series; x on a log scale."""
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=name)
        for x, y, label in points:
            ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def curves_plot(series: Dict[str, tuple], xlabel: str, ylabel: str, title: str, logy: bool = False,
                dashed: Sequence[str] = ()):
    """A Figure of curves ``name -> (xs, ys)``; the names in ``dashed`` are drawn dashed."""
    fig = _figure(9.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, color=f"C{i}", label=name, linestyle="--" if name in dashed else "-",
                marker="." if len(xs) < 30 else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
