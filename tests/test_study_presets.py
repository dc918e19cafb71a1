"""scripts/study_presets.py, study_criteria.py and study_report.py without training: the grids
(configurations x seeds), the criteria on synthetic results (supported / not supported / cannot
test, mean +- sd, margins from the seeds' spread), the report's copied/ordinary bpc and criteria
text, the criteria record, and the longrange preset's --dry-run and --help."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import study_criteria as sc  # noqa: E402
import study_presets as sp  # noqa: E402
import study_report  # noqa: E402
from utils import ConfigError  # noqa: E402

LR = sp.PRESETS["longrange"]
D = sp.D


def study(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_longrange_grid_is_every_configuration_at_every_seed():
    runs = sp.build_grid(LR)
    configs = ["fixed-64", f"fixed-{D}", f"adaptive-{D}", f"adaptive-{D}-ref", f"allattn-{D}", f"expire-{D}"]
    assert [r.name for r in runs] == [f"{c}-s{s}" for s in (1, 2, 3) for c in configs]
    for r in runs:
        f = r.flags
        assert f[f.index("--seed") + 1] == str(r.seed) and f.count("--seed") == 1
        assert f[f.index("--nbatches") + 1] == "25" and f[f.index("--niter") + 1] == str(LR.steps // 25)
        assert f[f.index("--attn-span") + 1] == ("64" if r.expire else str(r.max_span))  # expire: the block
        assert ("--expire-span" in f) == r.expire == (r.config == f"expire-{D}")
        assert ("--adapt-span" in f) == r.adaptive
        if r.adaptive:
            assert f[f.index("--adapt-span-init") + 1] == "0.5" and f[f.index("--adapt-span-loss") + 1] == "2e-6"
        assert ("--attn-impl" in f) == r.config.endswith("-ref")
        if r.pers_mem_size:
            assert f[f.index("--nlayers") + 1] == "6" and f[f.index("--pers-mem-size") + 1] == "128"
    long_fixed = [r for r in runs if r.config == f"fixed-{D}"]
    assert long_fixed and all(r.max_span >= LR.planted["max_distance"] for r in long_fixed)  # >= D
    assert len(sp.build_grid(sp.PRESETS["cpu"])) == 21 and len(sp.build_grid(sp.PRESETS["quick"])) == 7


def test_estimate_is_the_sum_of_step_times():
    e = sp.estimate(LR, jobs=2)
    train = 3 * LR.steps * sum(LR.step_s.values())
    assert e["train_s"] == pytest.approx(train)
    assert e["minutes"] == pytest.approx((train + e["eval_s"]) / 2 / 60 + (e["timing_s"] + sp.TIMING_WAIT_S) / 60)
    assert e["minutes"] <= 90  # the bound, at the estimated step times
    assert "ESTIMATED" in sp.describe("longrange") and "18 runs" in sp.describe("longrange")


def result(config, seed, dev, copied=None, flops=1e6, spans=None, rss=500.0):
    return {"name": f"{config}-s{seed}", "config": config, "seed": seed, "dev_bpc": dev, "test_bpc": dev,
            "copied_bpc": copied, "ordinary_bpc": None if copied is None else dev, "attn_flops_per_token": flops,
            "peak_mem_mb": rss, "head_spans": spans, "adaptive": spans is not None}


def test_margin_is_twice_the_pooled_sd_with_a_floor():
    rs = [result("fixed-a", s, v) for s, v in enumerate((1.0, 1.1, 1.3))]
    rs += [result("fixed-b", s, v) for s, v in enumerate((2.0, 2.0, 2.2))]
    stats = sc.summarize(rs)
    m, why = sc.margin(stats, ["fixed-a", "fixed-b"], "dev_bpc", 0.02)
    pooled = math.sqrt((stdev([1.0, 1.1, 1.3]) ** 2 + stdev([2.0, 2.0, 2.2]) ** 2) / 2)
    assert m == pytest.approx(2 * pooled) and "pooled sd" in why
    assert sc.margin(stats, ["fixed-a"], "dev_bpc", 5.0)[0] == 5.0  # the floor
    assert sc.margin(sc.summarize(rs[:1]), ["fixed-a"], "dev_bpc", 0.02)[0] is None  # one seed: no spread
    assert sc.fmt([1.0, 1.1, 1.3]) == f"{mean([1.0, 1.1, 1.3]):.3f} ± {stdev([1.0, 1.1, 1.3]):.3f} (n=3)"


def verdict(check, params, results, timing=None):
    return sc.CHECKS[check](params, sc.summarize(results), timing)[0]


def test_matches_beats_and_no_worse_verdicts():
    fixed = [result("F", s, v, copied=v) for s, v in enumerate((2.0, 2.1, 2.2))]  # sd 0.1: margin 0.2
    near = [result("A", s, v, copied=v) for s, v in enumerate((2.25, 2.25, 2.25))]  # +0.15
    far = [result("A", s, v, copied=v) for s, v in enumerate((2.4, 2.4, 2.4))]  # +0.30
    low = [result("A", s, v, copied=v) for s, v in enumerate((1.75, 1.75, 1.75))]  # -0.35
    p = {"a": "A", "b": "F", "metric": "dev_bpc", "spread": ("F",), "floor": 0.02}
    assert verdict("matches", p, fixed + near) == sc.SUPPORTED
    assert verdict("matches", p, fixed + far) == sc.NOT_SUPPORTED
    assert verdict("matches", p, fixed + low) == sc.NOT_SUPPORTED  # two-sided: better by more also fails
    assert verdict("no_worse", p, fixed + low) == sc.SUPPORTED and verdict("no_worse", p, fixed + far) == sc.NOT_SUPPORTED
    assert verdict("beats", {**p, "metric": "copied_bpc"}, fixed + low) == sc.SUPPORTED
    assert verdict("beats", {**p, "metric": "copied_bpc"}, fixed + near) == sc.NOT_SUPPORTED
    assert verdict("matches", p, fixed[:1] + near[:1]) == sc.CANNOT  # one seed each: no spread
    assert verdict("matches", p, fixed) == sc.CANNOT  # A did not finish


def test_span_timing_memory_and_flops_verdicts():
    long_short = [result("A", s, 1.0, spans=[[2100, 40], [50, 60]]) for s in (1, 2, 3)]
    all_long = [result("A", s, 1.0, spans=[[2100, 2000], [1500, 1900]]) for s in (1, 2, 3)]
    p = {"a": "A", "long": 2048, "short": 256}
    assert verdict("long_and_short", p, long_short) == sc.SUPPORTED
    assert verdict("long_and_short", p, all_long) == sc.NOT_SUPPORTED
    idle = {"ms": {"A": 100.0, "R": 250.0}, "load_before": 0.3}
    t = {"a": "A", "b": "R", "at_most": 0.5}
    assert verdict("time_ratio", t, [], idle) == sc.SUPPORTED
    assert verdict("time_ratio", {**t, "at_most": 0.3}, [], idle) == sc.NOT_SUPPORTED
    assert verdict("time_ratio", t, [], {**idle, "load_before": 3.0}) == sc.CANNOT  # a loaded machine
    assert verdict("time_ratio", t, [], None) == sc.CANNOT
    mem = [result("A", 1, 1.0, rss=500.0), result("R", 1, 1.0, rss=1000.0)]
    assert verdict("rss_ratio", {**t, "at_most": 0.6}, mem) == sc.SUPPORTED
    assert verdict("rss_ratio", {**t, "at_most": 0.4}, mem) == sc.NOT_SUPPORTED
    runs = [result("A", 1, 1.0, flops=1e6), result("F64", 1, 1.0, flops=1e5), result("F4k", 1, 1.0, flops=6e6)]
    q = {"a": "A", "fixed": ("F64", "F4k"), "metric": "dev_bpc", "spread": ("F64",), "floor": 0.02}
    assert verdict("equal_flops", q, runs) == sc.CANNOT  # none within 2x
    runs[2]["attn_flops_per_token"] = 1.5e6
    assert "nearest in attention FLOPs: F4k" in sc.CHECKS["equal_flops"](q, sc.summarize(runs), None)[1]


def test_every_criterion_is_evaluated_and_says_what_it_cannot_test():
    for name in ("cpu", "longrange"):
        configs = {c.name for c in sp.PRESETS[name].configs}
        verdicts = sc.evaluate(sc.CRITERIA[name], [], None)
        assert len(verdicts) == len(sc.CRITERIA[name]) and all(v["verdict"] == sc.CANNOT for v in verdicts)
        for c in sc.CRITERIA[name]:
            assert c.can and c.cannot and c.check in sc.CHECKS
            named = [v for k, v in c.args if k in ("a", "b")] + [x for k, v in c.args if k in ("spread", "fixed")
                                                                 for x in v]
            assert set(named) <= configs, (c.key, named)
    keys = {c.key for c in sc.CRITERIA["longrange"]}
    assert {"2-seen", "1-equal-max", "1-equal-flops", "T2-time", "T2-copied", "T3-time", "T3-rss",
            "T4-beats-short"} <= keys


def record(config, seed, dev, copied, ordinary, spans):
    r = {**result(config, seed, dev, copied=copied, spans=spans), "ordinary_bpc": ordinary, "max_span": D,
         "pers_mem_size": 0, "params": 1000, "steps": 10, "model_flops_per_token": 2e6, "span_avg": 100.0,
         "span_max": 2100.0, "tokens_per_s": 1.0}
    steps = [0, 5, 10]
    curves = {"step": [5, 10], "train_bpc": [3, 2], "val_bpc": [3, 2], "flops_step": steps,
              "attn_flops": [3e6, 2e6, 1e6], "span_step": steps,
              "head_spans": [[2048] * 4, [2070, 900, 300, 100], [2100, 40, 50, 60]]}
    return {"result": r, "curves": curves, "seconds": {"train": 1.0, "eval": 1.0}}


def test_report_shows_copied_and_ordinary_bpc_and_the_criteria(tmp_path):
    records = [record(f"adaptive-{D}", s, 1.5 + s / 100, 1.2 + s / 100, 1.6, [[2100, 40], [50, 60]])
               for s in (1, 2, 3)]
    verdicts = sc.evaluate(sc.CRITERIA["longrange"], [r["result"] for r in records], None)
    study_report.write(records, tmp_path, "longrange", "note", "python scripts/study.py ...", 15, verdicts, None)
    report = (tmp_path / "report.md").read_text()
    assert "| copied bpc | ordinary bpc |" in report
    assert f"| adaptive-{D}-s2 |" in report and "| 1.220 | 1.600 |" in report  # copied, ordinary of seed 2
    assert "1.220 ± 0.010 (n=3)" in report  # copied bpc, mean ± sd over the seeds
    for c in sc.CRITERIA["longrange"]:
        assert c.rule in report and c.cannot in report
    assert "**Verdict: supported.** longest / median head per seed" in report  # 2-seen on these spans
    assert "No timing phase yet" in report


def test_changed_criteria_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs").mkdir()
    changed = [c.to_dict() for c in sc.CRITERIA["longrange"]]
    changed[0]["rule"] = "something else"
    (out / "criteria.json").write_text(json.dumps(changed))
    before = (out / "criteria.json").read_text()
    proc = study("--preset", "longrange", "--data", tmp_path, "--out", out, "--report-only")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out") and "criteria" in proc.stderr
    assert (out / "criteria.json").read_text() == before  # left as it was


def test_longrange_dry_run_and_help_state_runs_and_estimate(tmp_path):
    proc = study("--preset", "longrange", "--data", tmp_path / "enwik8.zip", "--out", tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = [l.strip() for l in proc.stdout.splitlines()]
    train = [l for l in lines if " main.py " in l]
    score = [l for l in lines if "scripts/score_copies.py" in l]
    assert len(train) == 18 and len(score) == 36
    expire = [l for l in train if f"--expire-span --attn-lim {D} " in l]
    assert len(expire) == 3 and all("--attn-span 64 " in l and "--expire-span-ramp 64" in l for l in expire)
    assert all(f"--data {tmp_path / 'out' / 'planted'} " in l for l in train)  # planted from --data first
    assert lines[-1] == sp.describe("longrange") and "ESTIMATED" in lines[-1]
    assert not (tmp_path / "out").exists()
    help_text = study("--help").stdout
    for name in sp.PRESETS:
        assert f"  {name}: " in help_text
    assert "ESTIMATED" in help_text


def test_longrange_plants_an_enwik8_folder(tmp_path):
    """An enwik8-format folder is read back byte for byte and planted into OUT/planted: without
    its copies, each planted split is the folder's split, and the side file fits the text."""
    import numpy as np

    import planted
    import reference_format
    import study
    rng = np.random.default_rng(0)
    words = [b"the ", b"cat ", b"sat\n", b"on ", b"<page> ", b"[[a]] "]
    text = b"".join(words[i] for i in rng.integers(0, len(words), 9000))
    sizes = {"train": len(text) - 6000, "valid": 3000, "test": 3000}
    folder, start = tmp_path / "enwik8", 0
    folder.mkdir()
    for name in planted.SPLITS:
        part = np.frombuffer(text[start:start + sizes[name]], dtype=np.uint8)
        (folder / f"{name}.txt").write_bytes(reference_format.formatted(part, "enwik8"))
        start += sizes[name]
    assert study.enwik8_folder_bytes(folder) == (text, 3000)
    out = study.planted_data(LR, folder, tmp_path / "out")
    assert out == tmp_path / "out" / "planted"
    side, start = planted.read_side_file(out), 0
    for name in planted.SPLITS:
        stream = np.frombuffer((out / f"{name}.txt.raw").read_bytes(), dtype=np.uint8)
        dist = planted.copy_distances(side[name], len(stream))
        q = np.nonzero(dist)[0]
        assert (stream[q] == stream[q - dist[q]]).all()  # every copy repeats its source
        assert stream[dist == 0].tobytes() == text[start:start + sizes[name]]
        start += sizes[name]
    assert study.planted_data(LR, folder, tmp_path / "out") == out  # made once
    with pytest.raises(ConfigError, match="enwik8 format"):
        study.planted_data(LR, tmp_path, tmp_path / "other")  # a folder that is neither
