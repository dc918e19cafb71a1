"""The figures and report.md of scripts/study.py, generated from the runs' records.

A record is ``{"flags", "result", "curves", "seconds"}``: ``result`` holds the keys of
results.json, ``curves`` the logged history (step, train_bpc, val_bpc; flops_step,
attn_flops) and ``seconds`` the wall time of training and evaluation.
Each claim paragraph states its criterion, the numbers, and whether these runs support it.
"""
from pathlib import Path
from statistics import median
from typing import List, Optional

import plots
from flops import format_flops

FIGURES = {"a": "fig_a_bpc_vs_attn_flops.png", "b": "fig_b_attn_flops_vs_step.png",
           "c": "fig_c_head_spans.png", "d": "fig_d_allattn_vs_ff.png"}
LONG = 1000  # the adaptive-span paper's threshold for a long span
FLAT = 2.0  # "nearly flat": attention FLOPs grow less than this factor over the range of maxima
SAME_BPC = 0.01  # "no loss in bpc": within this of the best fixed span
MATCH_BPC = 0.02  # "matches": all-attention no worse than the feed-forward model by more than this


def _groups(results: List[dict]):
    fixed = sorted((r for r in results if not r["adaptive"]), key=lambda r: r["max_span"])
    adaptive = sorted((r for r in results if r["adaptive"] and not r["pers_mem_size"]), key=lambda r: r["max_span"])
    pers = [r for r in results if r["pers_mem_size"]]
    return fixed, adaptive, pers


def _partner(pers: dict, adaptive: List[dict]) -> Optional[dict]:
    return next((r for r in adaptive if r["max_span"] == pers["max_span"]), None)


# ---- figures ----------------------------------------------------------------------
def _figure_a(records):
    fixed, adaptive, _ = _groups([r["result"] for r in records])
    series = {name: [(r["attn_flops_per_token"], r["dev_bpc"], f"L={r['max_span']}") for r in runs]
              for name, runs in (("fixed span", fixed), ("adaptive span (max L)", adaptive)) if runs}
    return plots.points_plot(series, "attention FLOPs per token (forward, end of training)",
                             "dev bpc (whole dev set)", "(a) dev bpc against attention FLOPs")


def _figure_b(records):
    series, dashed = {}, []
    steps = [s for rec in records for s in rec["curves"]["flops_step"]] or [0]
    for rec in records:
        r, c = rec["result"], rec["curves"]
        if r["adaptive"]:
            series[r["name"]] = (c["flops_step"], c["attn_flops"])
        else:
            series[r["name"]] = ([min(steps), max(steps)], [r["attn_flops_per_token"]] * 2)
            dashed.append(r["name"])
    return plots.curves_plot(series, "training step", "attention FLOPs per token (forward)",
                             "(b) attention FLOPs as the spans are learned (dashed: fixed spans)",
                             logy=True, dashed=dashed)


def _figure_c(records):
    _, adaptive, _ = _groups([r["result"] for r in records])
    if not adaptive:
        return None
    r = adaptive[-1]
    flat = [s for layer in r["head_spans"] for s in layer]
    title = (f"(c) {r['name']}: spans of its {len(flat)} heads\nmedian {median(flat):.0f}, max {max(flat)}, "
             f"{sum(s > LONG for s in flat)} over {LONG}")
    return plots.spans_plot(r["head_spans"], r["max_span"], title)


def _figure_d(records):
    by_name = {rec["result"]["name"]: rec for rec in records}
    _, adaptive, pers = _groups([r["result"] for r in records])
    if not pers or _partner(pers[0], adaptive) is None:
        return None
    series = {}
    for r in (pers[0], _partner(pers[0], adaptive)):
        c = by_name[r["name"]]["curves"]
        label = f"{r['name']} ({r['params'] / 1e6:.2f}M params)"
        series[label + " val"] = (c["step"], c["val_bpc"])
        series[label + " train"] = (c["step"], c["train_bpc"])
    dashed = [name for name in series if name.endswith("train")]
    return plots.curves_plot(series, "training step", "bpc (val: rolling partial dev estimate)",
                             "(d) all-attention against feed-forward (dashed: training)", dashed=dashed)


def write_figures(records: List[dict], out: Path) -> List[str]:
    """The PNGs that could be drawn (ImportError without matplotlib)."""
    import matplotlib  # noqa: F401  (fail early and clearly)
    written = []
    for key, make in (("a", _figure_a), ("b", _figure_b), ("c", _figure_c), ("d", _figure_d)):
        fig = make(records)
        if fig is not None:
            plots.save(fig, out / FIGURES[key])
            written.append(key)
    return written


# ---- text -------------------------------------------------------------------------
def _fmt(value, digits=3):
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def table(records: List[dict]) -> str:
    head = ("| run | max span | adaptive | pers N | params | steps | dev bpc | test bpc | attn FLOPs/tok "
            "| model FLOPs/tok | tokens/s | peak MB | span avg | span max | train s (CPU s) | eval s (CPU s) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for rec in records:
        r, s = rec["result"], rec["seconds"]
        lines.append(f"| {r['name']} | {r['max_span']} | {'yes' if r['adaptive'] else 'no'} | {r['pers_mem_size']} "
                     f"| {r['params']:,} | {r['steps']} | {r['dev_bpc']:.3f} | {r['test_bpc']:.3f} "
                     f"| {format_flops(r['attn_flops_per_token'])} | {format_flops(r['model_flops_per_token'])} "
                     f"| {_fmt(r['tokens_per_s'], 0)} | {_fmt(r['peak_mem_mb'], 0)} | {r['span_avg']:.0f} "
                     f"| {r['span_max']:.0f} | {s['train']:.0f} ({_fmt(s.get('train_cpu'), 0)}) "
                     f"| {s['eval']:.0f} ({_fmt(s.get('eval_cpu'), 0)}) |")
    lines.append("")
    lines.append("Wall seconds of training are summed over the processes of a resumed run. A CPU time shown "
                 "as – was not counted in full (part of the run was trained by a process this script did not "
                 "measure).")
    return "\n".join(lines)


def usage_text(records: List[dict]) -> str:
    """The measured cost of the study, as wall time here and as CPU time (load-independent)."""
    secs = [rec["seconds"] for rec in records]
    wall = sum(s["train"] + s["eval"] for s in secs)
    text = f"Wall time of the runs, summed: {wall / 60:.1f} min (train and evaluation processes, as run here)."
    if all("train_cpu" in s and "eval_cpu" in s for s in secs):
        cpu = sum(s["train_cpu"] + s["eval_cpu"] for s in secs)
        ev = sum(s["eval_cpu"] for s in secs)
        text += (f" CPU time, summed: {cpu / 60:.1f} core-minutes, {ev / 60:.1f} of them evaluating; with one "
                 f"thread per run that is about {cpu / 120:.0f} minutes on 2 idle cores (--jobs 2).")
    return text


def _runs_text(runs: List[dict]) -> str:
    return "; ".join(f"L={r['max_span']}: {format_flops(r['attn_flops_per_token'])} FLOPs, {r['dev_bpc']:.3f} bpc"
                     for r in runs)


def _growth(runs: List[dict], what: str) -> str:
    if len(runs) < 2:
        return f"{_runs_text(runs)}; the growth with the {what} needs two or more of these runs"
    ratio = runs[-1]["attn_flops_per_token"] / runs[0]["attn_flops_per_token"]
    return (f"{_runs_text(runs)}: attention FLOPs per token grow {ratio:.2f}x over a "
            f"{runs[-1]['max_span'] / runs[0]['max_span']:.0f}x range of the {what}")


def claim_flops(results: List[dict]) -> str:
    fixed, adaptive, _ = _groups(results)
    if not fixed or not adaptive:
        return "Not measured: no fixed-span or no adaptive-span run finished."
    best, top = min(fixed, key=lambda r: r["dev_bpc"]), adaptive[-1]
    diff = top["dev_bpc"] - best["dev_bpc"]
    same = "; ".join(f"at L={a['max_span']} adaptive {a['dev_bpc']:.3f} against fixed {f['dev_bpc']:.3f} bpc "
                     f"with {a['attn_flops_per_token'] / f['attn_flops_per_token']:.2f}x its attention FLOPs"
                     for a in adaptive for f in fixed if a["max_span"] == f["max_span"])
    if len(adaptive) >= 2:
        ratio = adaptive[-1]["attn_flops_per_token"] / adaptive[0]["attn_flops_per_token"]
        flat = f"{'supported' if ratio < FLAT else 'not supported'} here"
    else:
        flat = "not measured (one adaptive run)"
    partial = len(fixed) < 3 or len(adaptive) < 3
    return (f"Fixed spans ({_growth(fixed, 'span')}). Adaptive spans ({_growth(adaptive, 'maximum span')}). "
            f"At the same maximum: {same or 'no pair finished'}. The best fixed span, {best['name']}, reaches "
            f"{best['dev_bpc']:.3f} dev bpc; {top['name']} reaches {top['dev_bpc']:.3f} ({diff:+.3f}). "
            f"**FLOPs nearly flat (criterion: adaptive attention FLOPs grow less than {FLAT:g}x over the range "
            f"of maxima): {flat}. No loss in bpc (criterion: {top['name']} within {SAME_BPC} bpc of the best "
            f"fixed span{' that finished' if partial else ''}): {'supported' if diff <= SAME_BPC else 'not supported'} "
            f"here.**")


def claim_spans(results: List[dict]) -> str:
    _, adaptive, _ = _groups(results)
    if not adaptive:
        return "Not measured: no adaptive-span run finished."
    r = adaptive[-1]
    flat = sorted(s for layer in r["head_spans"] for s in layer)
    n_long, n = sum(s > LONG for s in flat), len(flat)
    layers = ", ".join(f"{sum(l) / len(l):.0f}" for l in r["head_spans"])
    text = (f"In {r['name']} after {r['steps']} steps, {n_long} of {n} heads span over {LONG} tokens "
            f"(the authors' 12-layer model: 5 of 96). The spans range from {flat[0]} to {flat[-1]} "
            f"(median {median(flat):.0f}; the ramp of 32 is included, so an unused head shows about 32); "
            f"mean span per layer, bottom to top: {layers}. ")
    if n_long == 0:
        return text + (f"**Not supported here: no head reaches {LONG} tokens at this training length; "
                       f"the longest span is {flat[-1]}.** Whether most heads stay short while a few grow "
                       "long cannot be told from these runs.")
    if n_long > n / 4:
        return text + f"**Not supported here: {n_long} of {n} heads are long, not a few.**"
    return text + f"**Supported here: most heads are short and {n_long} of {n} are long.**"


def claim_allattn(results: List[dict]) -> str:
    _, adaptive, pers = _groups(results)
    ff = _partner(pers[0], adaptive) if pers else None
    if ff is None:
        return "Not measured: the all-attention run or its feed-forward partner did not finish."
    p = pers[0]
    dev, test = p["dev_bpc"] - ff["dev_bpc"], p["test_bpc"] - ff["test_bpc"]
    text = (f"{p['name']} ({p['params']:,} parameters, {p['pers_mem_size']} persistent vectors per head, no "
            f"feed-forward) against {ff['name']} ({ff['params']:,} parameters, {p['params'] / ff['params']:.3f}x): "
            f"dev {p['dev_bpc']:.3f} against {ff['dev_bpc']:.3f} bpc ({dev:+.3f}), test {p['test_bpc']:.3f} "
            f"against {ff['test_bpc']:.3f} ({test:+.3f}), after {p['steps']} and {ff['steps']} steps; forward "
            f"FLOPs per token {format_flops(p['model_flops_per_token'])} against "
            f"{format_flops(ff['model_flops_per_token'])}, training speed {_fmt(p['tokens_per_s'], 0)} against "
            f"{_fmt(ff['tokens_per_s'], 0)} tokens/s. ")
    if dev <= MATCH_BPC:
        side = "better" if dev < 0 else "worse"
        return text + (f"**Supported here (criterion: dev bpc no more than {MATCH_BPC} worse than the "
                       f"feed-forward model's): the all-attention model is {abs(dev):.3f} bpc {side}.**")
    return text + (f"**Not supported here (criterion: dev bpc no more than {MATCH_BPC} worse than the "
                   f"feed-forward model's): the all-attention model is {dev:.3f} bpc worse at this training "
                   "length.**")


CLAIMS = (("A maximum span of thousands of tokens costs about what a short span costs, at no loss in bpc",
           claim_flops, "a", "b"),
          ("Most heads learn short spans and a few learn long ones", claim_spans, "c"),
          ("An all-attention stack matches a feed-forward one of about the same size", claim_allattn, "d"))
CAPTIONS = {"a": "(a) dev bpc against attention FLOPs per token, one point per maximum span",
            "b": "(b) attention FLOPs per token against the training step (adaptive runs; fixed spans dashed)",
            "c": "(c) every head's learned span, layer by layer, in the adaptive run with the largest maximum",
            "d": "(d) learning curves of the all-attention model and the feed-forward model"}


def write(records: List[dict], out: Path, preset: str, note: str, command: str, total: int) -> None:
    """OUT/report.md and the figures; prints a line when matplotlib is missing."""
    try:
        figures = write_figures(records, out) if records else []
        missing = ""
    except ImportError:
        figures, missing = [], "matplotlib is not installed: no figures (pip install -r requirements-viz.txt)"
        print(missing)
    results = [r["result"] for r in records]
    lines = [f"# What the papers claim, measured: preset `{preset}`", "",
             f"Command: `{command}`. {len(records)} of {total} runs finished"
             + ("." if len(records) == total else "; the same command resumes the others."), "", note, "",
             "dev/test bpc: `main.py --full-eval-mode --batch-sz 8` on the whole dev and test sets (every "
             "token scored). FLOPs: forward, per token, as flops.py counts them with the spans at the end of "
             "training. tokens/s: median over the logged iterations of training. peak MB: the largest resident "
             "memory of the whole training process (host memory, ru_maxrss, default allocator; the token "
             "cache is built before the runs, in a process of its own). span avg / max: ramp included; a fixed span shows L. "
             "tokens/s and wall seconds depend on the load of the machine (it may have been shared); the CPU "
             "seconds, summed over the processes of a run, do not.",
             "", table(records), "", usage_text(records), ""]
    if missing:
        lines += [missing, ""]
    for i, (title, claim, *keys) in enumerate(CLAIMS, 1):
        lines += [f"## Claim {i}: {title}", "", claim(results), ""]
        lines += [f"![{CAPTIONS[k]}]({FIGURES[k]})" + "\n" for k in keys if k in figures]
    (out / "report.md").write_text("\n".join(lines))
