"""The figures and report.md of scripts/study.py, generated from the runs' records, the
criteria's verdicts (scripts/study_criteria.py) and the timing phase (OUT/timing.json).

A record is what scripts/study_run.py writes (``result``, ``curves``, ``seconds``). Figures
(b) to (e) show the first seed's runs; (a) and the tables every seed.
"""
from pathlib import Path
from statistics import median
from typing import List, Optional

import plots
from flops import format_flops
from study_criteria import fmt, summarize
from study_reach import CAPTION, FIGURE, reach_figure, reach_text

FIGURES = {"a": "fig_a_bpc_vs_attn_flops.png", "b": "fig_b_attn_flops_vs_step.png",
           "c": "fig_c_head_spans.png", "d": "fig_d_allattn_vs_ff.png", "e": "fig_e_head_spans_vs_step.png",
           "f": FIGURE}
CAPTIONS = {"a": "(a) dev bpc against attention FLOPs per token, one point per run",
            "b": "(b) attention FLOPs per token against the training step, from step 0 (first seed)",
            "c": "(c) every head's learned span, layer by layer, in the adaptive run with the largest maximum "
                 "(first seed)",
            "d": "(d) learning curves of the all-attention model and the feed-forward model (first seed)",
            "e": "(e) each head's span against the training step, from step 0 (adaptive run with the "
                 "largest maximum, first seed)", "f": CAPTION}


def _first_seed(records):
    seed = min(rec["result"]["seed"] for rec in records)
    return [rec for rec in records if rec["result"]["seed"] == seed]


def _largest_adaptive(records):
    ada = [rec for rec in records if rec["result"]["adaptive"] and not rec["result"]["pers_mem_size"]
           and "ref" not in rec["result"]["config"]]
    return max(ada, key=lambda rec: rec["result"]["max_span"]) if ada else None


# ---- figures ----------------------------------------------------------------------
def _figure_a(records):
    series = {}
    for rec in records:
        r = rec["result"]
        kind = ("Expire-span" if r.get("expire") else "fixed span" if not r["adaptive"] else
                "all-attention" if r["pers_mem_size"] else
                "adaptive, reference path" if r["config"].endswith("-ref") else "adaptive span (max L)")
        series.setdefault(kind, []).append((r["attn_flops_per_token"], r["dev_bpc"], f"L={r['max_span']} s{r['seed']}"))
    return plots.points_plot(series, "attention FLOPs per token (forward, end of training)",
                             "dev bpc", "(a) dev bpc against attention FLOPs (every seed)")


def _figure_b(records):
    series = {rec["result"]["name"]: (rec["curves"]["flops_step"], rec["curves"]["attn_flops"])
              for rec in _first_seed(records)}
    dashed = [rec["result"]["name"] for rec in records if not rec["result"]["adaptive"]
              and not rec["result"].get("expire")]
    return plots.curves_plot(series, "training step", "attention FLOPs per token (forward)",
                             "(b) attention FLOPs as the spans are learned, from step 0 (dashed: fixed spans)",
                             logy=True, dashed=dashed)


def _figure_c(records):
    rec = _largest_adaptive(_first_seed(records))
    if rec is None:
        return None
    r = rec["result"]
    flat = [s for layer in r["head_spans"] for s in layer]
    title = (f"(c) {r['name']}: spans of its {len(flat)} heads\nmedian {median(flat):.0f}, max {max(flat)}, "
             f"{sum(s > 1000 for s in flat)} over 1000")
    return plots.spans_plot(r["head_spans"], r["max_span"], title)


def _figure_d(records):
    first = _first_seed(records)
    pers = [rec for rec in first if rec["result"]["pers_mem_size"]]
    ff = _largest_adaptive(first)
    if not pers or ff is None:
        return None
    series = {}
    for rec in (pers[0], ff):
        r, c = rec["result"], rec["curves"]
        label = f"{r['name']} ({r['params'] / 1e6:.2f}M params)"
        series[label + " val"] = (c["step"], c["val_bpc"])
        series[label + " train"] = (c["step"], c["train_bpc"])
    dashed = [name for name in series if name.endswith("train")]
    return plots.curves_plot(series, "training step", "bpc (val: rolling partial dev estimate)",
                             "(d) all-attention against feed-forward (dashed: training)", dashed=dashed)


def _figure_e(records):
    rec = _largest_adaptive(_first_seed(records))
    if rec is None or len(rec["curves"].get("span_step", [])) < 2:
        return None
    c, per_layer = rec["curves"], len(rec["result"]["head_spans"][0])
    series = {f"layer {i // per_layer} head {i % per_layer}": (c["span_step"], [h[i] for h in c["head_spans"]])
              for i in range(len(c["head_spans"][0]))}
    return plots.curves_plot(series, "training step", "span (tokens, ramp included)",
                             f"(e) {rec['result']['name']}: each head's span from step 0", logy=True)


def write_figures(records: List[dict], out: Path) -> List[str]:
    """The PNGs that could be drawn (ImportError without matplotlib)."""
    import matplotlib  # noqa: F401  (fail early and clearly)
    written = []
    for key, make in (("a", _figure_a), ("b", _figure_b), ("c", _figure_c), ("d", _figure_d), ("e", _figure_e),
                      ("f", reach_figure)):
        fig = make(records)
        if fig is not None:
            plots.save(fig, out / FIGURES[key])
            written.append(key)
    return written


# ---- text -------------------------------------------------------------------------
def _fmt(value, digits=3):
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def table(records: List[dict]) -> str:
    head = ("| run | max span | adaptive | pers N | params | steps | dev bpc | test bpc | copied bpc | ordinary bpc "
            "| attn FLOPs/tok | model FLOPs/tok | peak MB | span avg | span max | train s (CPU s) | eval s (CPU s) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for rec in records:
        r, s = rec["result"], rec["seconds"]
        lines.append(f"| {r['name']} | {r['max_span']} | {'yes' if r['adaptive'] else 'no'} | {r['pers_mem_size']} "
                     f"| {r['params']:,} | {r['steps']} | {r['dev_bpc']:.3f} | {r['test_bpc']:.3f} "
                     f"| {_fmt(r['copied_bpc'])} | {_fmt(r['ordinary_bpc'])} "
                     f"| {format_flops(r['attn_flops_per_token'])} | {format_flops(r['model_flops_per_token'])} "
                     f"| {_fmt(r['peak_mem_mb'], 0)} | {r['span_avg']:.0f} "
                     f"| {r['span_max']:.0f} | {s['train']:.0f} ({_fmt(s.get('train_cpu'), 0)}) "
                     f"| {s['eval']:.0f} ({_fmt(s.get('eval_cpu'), 0)}) |")
    lines.append("")
    lines.append("Wall seconds of training are summed over the processes of a resumed run. A CPU time shown "
                 "as – was not counted in full (part of the run was trained by a process this script did not "
                 "measure). Wall seconds depend on the load of the machine; they are not speed figures.")
    return "\n".join(lines)


def usage_text(records: List[dict]) -> str:
    """The cost of the study as run here: wall time, and CPU time where every process was counted."""
    secs = [rec["seconds"] for rec in records]
    text = (f"Wall time of the runs, summed: {sum(s['train'] + s['eval'] for s in secs) / 60:.1f} min (train and "
            "evaluation processes, as run here).")
    if all("train_cpu" in s and "eval_cpu" in s for s in secs):
        cpu = sum(s["train_cpu"] + s["eval_cpu"] for s in secs)
        text += f" CPU time, summed: {cpu / 60:.1f} core-minutes, {cpu / 120:.0f} minutes on 2 cores."
    return text


def summary_table(records: List[dict], timing: Optional[dict]) -> str:
    """Per configuration, mean ± sd over its seeds; ms/step from the timing phase."""
    stats = summarize([rec["result"] for rec in records])
    head = ("| configuration | seeds | dev bpc | test bpc | copied bpc | ordinary bpc | attn FLOPs/tok "
            "| peak MB | span avg | span max | ms/step (timing phase) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, entry in stats.items():
        v = entry["values"]

        def cell(key, digits=3):
            return fmt(v[key], digits) if key in v else "–"

        ms = (timing or {}).get("ms", {}).get(name)
        lines.append(f"| {name} | {len(entry['runs'])} | {cell('dev_bpc')} | {cell('test_bpc')} "
                     f"| {cell('copied_bpc')} | {cell('ordinary_bpc')} | {cell('attn_flops_per_token', 0)} "
                     f"| {cell('peak_mem_mb', 0)} | {cell('span_avg', 0)} | {cell('span_max', 0)} "
                     f"| {_fmt(ms, 1)} |")
    return "\n".join(lines)


def timing_text(timing: Optional[dict]) -> str:
    if not timing:
        return ("No timing phase yet (it runs once the first seed of every timed configuration has finished): "
                "no speed figure is reported.")
    def kept(model):  # Expire-span: the memory the timing phase filled, per layer
        return f", kept memory {'/'.join(map(str, model['mem_layers']))}" if model.get("mem_layers") else ""

    per = "; ".join(f"{n} {ms:.1f} ms (CPU {timing['cpu_ms'][n]:.1f} ms, span avg "
                    f"{_fmt(timing['models'][n]['span_avg'], 0)}{kept(timing['models'][n])}, "
                    f"{timing['models'][n]['attn_impl']} path)" for n, ms in timing["ms"].items())
    return (f"Timing phase (scripts/study_timing.py, after training, one process, one thread): median ms per "
            f"forward and backward step of each first-seed checkpoint at its learned spans, the configurations "
            f"alternating, {timing['steps']} repeats: {per}. Load average {timing['load_before']:.2f} before "
            f"and {timing['load_after']:.2f} after (speed verdicts need at most 1.0 before). Whole-process "
            f"peak RSS of the timing process {timing['process_peak_mb']:.0f} MB.")


def criteria_text(verdicts: List[dict]) -> List[str]:
    lines = ["## Criteria and verdicts", "",
             "Written in scripts/study_criteria.py before the runs and recorded in OUT/criteria.json before the "
             "first run; never changed after a result is seen. Margins come from the runs' own seeds "
             "(the rule is in each line).", ""]
    for v in verdicts:
        lines += [f"### {v['key']} ({v['claim']})", "", f"Criterion: {v['rule']}.", "",
                  f"**Verdict: {v['verdict']}.** {v['numbers']}.", "",
                  f"What this run can test: {v['can']}. What it cannot: {v['cannot']}.", ""]
        if v.get("history"):
            lines += [f"Earlier criterion, changed: {v['history']}", ""]
    return lines


def write(records: List[dict], out: Path, preset: str, note: str, command: str, total: int,
          verdicts: List[dict] = (), timing: Optional[dict] = None) -> None:
    """OUT/report.md and the figures; prints a line when matplotlib is missing."""
    try:
        figures = write_figures(records, out) if records else []
        missing = ""
    except ImportError:
        figures, missing = [], "matplotlib is not installed: no figures (pip install -r requirements-viz.txt)"
        print(missing)
    lines = [f"# What the papers claim, measured: preset `{preset}`", "",
             f"Command: `{command}`. {len(records)} of {total} runs finished"
             + ("." if len(records) == total else "; the same command resumes the others."), "", note, "",
             "dev/test bpc: the evaluation named above (every scored token). copied / ordinary bpc: on the planted "
             "corpus, the valid tokens that are planted copies whose source lies in the same stream, and the others "
             "(scripts/score_copies.py). FLOPs: forward, per token, as flops.py counts them with the spans at the "
             "end of training. peak MB: the largest resident memory of the whole training process (host memory, "
             "ru_maxrss; the token cache is built before the runs, in a process of its own). span avg / max: ramp "
             "included; a fixed span shows L. Step times come only from the timing phase below, never from the "
             "training runs' tokens/s (the runs share the machine).", "",
             "## By configuration (mean ± sd over seeds)", "", summary_table(records, timing), "",
             timing_text(timing), "", *reach_text(records, timing), "## Every run", "", table(records), "",
             usage_text(records), ""]
    if missing:
        lines += [missing, ""]
    lines += criteria_text(list(verdicts))
    lines += ["## Figures", ""] + [f"![{CAPTIONS[k]}]({FIGURES[k]})\n" for k in sorted(figures)]
    (out / "report.md").write_text("\n".join(lines))
