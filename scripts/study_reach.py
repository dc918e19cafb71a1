"""The report's comparison of the learned-context methods on a planted corpus (issue 22): per
configuration, how far back it reaches on copied positions, its copied and ordinary bpc, its
ms/step (timing phase) and peak RSS, the kept memory per layer of an Expire-span run; and a
figure of the copied bpc per distance octave.

Reach is ``study_criteria.reach``: the upper end of the farthest distance octave whose mean
copied bpc is below the short fixed span's by more than that octave's margin from the seeds.
"""
import math
from statistics import mean
from typing import List, Optional

import plots
from study_criteria import octave_values, fmt, reach, summarize

SHORT = "fixed-64"  # the span that cannot reach the planted distances (all >= 64)
FIGURE = "fig_f_copied_bpc_by_octave.png"
CAPTION = "(f) bpc on copied positions per distance octave, mean over seeds, one curve per configuration"


def _octaves(stats) -> List[str]:
    found = {o for name in stats for o in octave_values(stats, name)}
    return sorted(found, key=lambda o: int(o.split("-")[0]))


def _memory(entry) -> str:
    runs = [r for r in entry["runs"] if r.get("mem_layers")]
    if not runs:
        return "–"
    layers = "; ".join("/".join(map(str, r["mem_layers"])) for r in runs)
    dropped = [r["dropped_frac"] for r in runs if r.get("dropped_frac") is not None]
    return layers + (f" (dropped {100 * mean(dropped):.0f}%)" if dropped else "")


def reach_table(records: List[dict], timing: Optional[dict]) -> Optional[str]:
    """The comparison as markdown, or None when no run has copied bpc per octave."""
    stats = summarize([rec["result"] for rec in records])
    octaves = _octaves(stats)
    if not octaves:
        return None
    head = ("| configuration | reach (tokens) | copied bpc | ordinary bpc | " + " | ".join(octaves)
            + " | ms/step (timing phase) | peak MB | kept memory per layer, per seed |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, entry in stats.items():
        v, per = entry["values"], octave_values(stats, name)
        far = reach(stats, name, SHORT)[0] if name != SHORT else None
        ms = (timing or {}).get("ms", {}).get(name)
        cells = [fmt(per[o]) if o in per else "–" for o in octaves]
        lines.append(f"| {name} | {'–' if far is None else far} "
                     f"| {fmt(v['copied_bpc']) if 'copied_bpc' in v else '–'} "
                     f"| {fmt(v['ordinary_bpc']) if 'ordinary_bpc' in v else '–'} | " + " | ".join(cells)
                     + f" | {'–' if ms is None else f'{ms:.1f}'} "
                     f"| {fmt(v['peak_mem_mb'], 0) if 'peak_mem_mb' in v else '–'} | {_memory(entry)} |")
    return "\n".join(lines)


def reach_text(records: List[dict], timing: Optional[dict]) -> List[str]:
    """The report's section (no lines without copied bpc per octave)."""
    table = reach_table(records, timing)
    if table is None:
        return []
    return ["## How far back each method reaches on copied positions", "",
            f"Reach: the upper end of the farthest distance octave whose mean bpc on copied positions (valid, "
            f"copies whose source lies in the scored stream) is below {SHORT}'s by more than that octave's margin "
            f"(2 x pooled sd of the two configurations' seeds there, at least 0.02 bpc); 0: no octave is; –: "
            f"fewer than 2 seeds (no spread). Octave columns: copied bpc at distances lo-hi, mean ± sd over "
            "seeds. ms/step: the interleaved timing phase (one thread, at the learned spans); peak MB: the "
            "training process's peak RSS. Kept memory per layer (Expire-span): the memory length of each "
            "layer, bottom to top, at the last logged iteration of training; dropped: 1 - mean kept / "
            "--attn-lim.", "", table, ""]


def reach_figure(records: List[dict]):
    """Copied bpc per distance octave (mean over seeds) per configuration, or None."""
    stats = summarize([rec["result"] for rec in records])
    series = {}
    for name in stats:
        per = octave_values(stats, name)
        octaves = sorted(per, key=lambda o: int(o.split("-")[0]))
        if octaves:
            series[name] = ([math.log2(int(o.split("-")[0])) for o in octaves], [mean(per[o]) for o in octaves])
    if not series:
        return None
    return plots.curves_plot(series, "log2 of the distance octave's lower end (6: 64-127, 11: 2048-4095)",
                             "bpc on copied positions (valid)", CAPTION, dashed=[SHORT])
