"""The longrange preset's Expire-span run (issue 22): its flags in the grid, its criteria on
synthetic results (supported / not supported / cannot test), the reach of each method as the
report defines it and shows it, and a tiny trained expire checkpoint read into a record and
stepped by the timing phase (scripts/study_timing.py)."""
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import study_criteria as sc  # noqa: E402
import study_presets as sp  # noqa: E402
import study_reach  # noqa: E402
import study_report  # noqa: E402

LR, D = sp.PRESETS["longrange"], sp.D
E, A, S = f"expire-{D}", f"adaptive-{D}", "fixed-64"


def test_expire_configuration_in_the_grid_seeds_and_timing():
    runs = {r.name: r for r in sp.build_grid(LR)}
    for seed in LR.seeds:
        f, ada = runs[f"{E}-s{seed}"].flags, runs[f"{A}-s{seed}"].flags
        assert runs[f"{E}-s{seed}"].expire and not runs[f"{E}-s{seed}"].adaptive
        values = {k: f[f.index(k) + 1] for k in ("--attn-lim", "--expire-span-ramp", "--expire-span-loss",
                                                  "--expire-span-init-percentage", "--attn-span", "--block-sz")}
        assert values == {"--attn-lim": str(D), "--expire-span-ramp": "64", "--expire-span-loss": "1e-6",
                          "--expire-span-init-percentage": "0.5", "--attn-span": "64", "--block-sz": "64"}
        assert "--expire-span" in f and "--adapt-span" not in f
        for k in ("--nlayers", "--hid-sz", "--nheads", "--inner-hid-sz", "--batch-sz", "--seed", "--niter"):
            assert f[f.index(k) + 1] == ada[ada.index(k) + 1], k  # the adaptive runs' model and schedule
    assert E in LR.timed and E in LR.step_s and E in LR.eval_s
    assert sp.estimate(LR, 2)["minutes"] <= 90


def res(config, seed, copied=2.0, mem=None, octaves=None):
    return {"name": f"{config}-s{seed}", "config": config, "seed": seed, "dev_bpc": 2.0, "test_bpc": 2.0,
            "copied_bpc": copied, "ordinary_bpc": 2.0, "peak_mem_mb": 500.0, "mem_layers": mem,
            "dropped_frac": None if mem is None else 1 - mean(mem) / D, "octave_bpc": octaves}


def verdict(key, results, timing=None):
    c = next(c for c in sc.CRITERIA["longrange"] if c.key == key)
    return sc.CHECKS[c.check](c.params(), sc.summarize(results), timing)


def test_kept_memory_criterion():
    keeps_far = [res(E, s, mem=[320, 64, 1000, 128]) for s in (1, 2, 3)]  # max > 256, mean 378 < 2048
    assert verdict("E1-keeps-far-drops-most", keeps_far)[0] == sc.SUPPORTED
    short = keeps_far[:2] + [res(E, 3, mem=[128, 64, 192, 256])]  # one seed keeps nothing past 4 blocks
    assert verdict("E1-keeps-far-drops-most", short)[0] == sc.NOT_SUPPORTED
    keeps_most = [res(E, s, mem=[2112, 2112, 2048, 2112]) for s in (1, 2, 3)]  # mean >= 0.5 L
    verdict_, text = verdict("E1-keeps-far-drops-most", keeps_most)
    assert verdict_ == sc.NOT_SUPPORTED and "2112/2112/2048/2112" in text
    assert verdict("E1-keeps-far-drops-most", [res(E, 1)])[0] == sc.CANNOT  # no kept memory logged
    assert verdict("E1-keeps-far-drops-most", [])[0] == sc.CANNOT


def octaves(values):
    return dict(zip(("64-127", "128-255", "256-511", "512-1023"), values))


def test_reach_is_the_farthest_octave_below_the_short_span_by_the_margin():
    short = [res(S, s, octaves=octaves([3.0 + d, 3.0 + d, 3.0 + d, 3.0 + d])) for s, d in ((1, 0), (2, .1), (3, .2))]
    far = [res(E, s, octaves=octaves([2.0, 2.5, 3.0, 2.5])) for s in (1, 2, 3)]  # 256-511: 0.1 below, margin 0.14
    stats = sc.summarize(short + far)
    reach, rows = sc.reach(stats, E, S)
    margin = 2 * math.sqrt(stdev([3.0, 3.1, 3.2]) ** 2 / 2)  # pooled over fixed-64's sd and expire's 0
    assert rows["256-511"]["margin"] == pytest.approx(margin) and not rows["256-511"]["beats"]
    assert reach == 1024 and rows["512-1023"]["beats"]  # the farthest, not the first run of octaves
    assert verdict("E4-reach", short + far)[0] == sc.SUPPORTED  # >= 512
    near = [res(E, s, octaves=octaves([2.0, 2.5, 3.1, 3.1])) for s in (1, 2, 3)]
    assert sc.reach(sc.summarize(short + near), E, S)[0] == 256
    assert verdict("E4-reach", short + near)[0] == sc.NOT_SUPPORTED
    assert verdict("E4-reach", short[:1] + near[:1])[0] == sc.CANNOT  # one seed each: no spread
    assert verdict("E4-reach", short)[0] == sc.CANNOT  # expire did not finish


def test_expire_against_adaptive_and_the_short_span():
    ada = [res(A, s, copied=c) for s, c in ((1, 2.0), (2, 2.1), (3, 2.2))]
    exp = [res(E, s, copied=c) for s, c in ((1, 2.05), (2, 2.15), (3, 2.25))]
    assert verdict("E2-copied-vs-adaptive", ada + exp)[0] == sc.SUPPORTED  # +0.05, margin 0.2
    worse = [res(E, s, copied=2.6) for s in (1, 2, 3)]
    assert verdict("E2-copied-vs-adaptive", ada + worse)[0] == sc.NOT_SUPPORTED
    better = [res(E, s, copied=1.6) for s in (1, 2, 3)]
    assert verdict("E2-copied-vs-adaptive", ada + better)[0] == sc.NOT_SUPPORTED  # two-sided
    short = [res(S, s, copied=c) for s, c in ((1, 3.0), (2, 3.1), (3, 3.2))]
    assert verdict("E3-beats-short", short + exp)[0] == sc.SUPPORTED
    assert verdict("E3-beats-short", short + [res(E, s, copied=3.0) for s in (1, 2, 3)])[0] == sc.NOT_SUPPORTED
    assert verdict("E3-beats-short", short)[0] == sc.CANNOT


def record(r):
    r = {**r, "max_span": D, "adaptive": r["config"] == A, "pers_mem_size": 0, "params": 1000, "steps": 10,
         "attn_flops_per_token": 1e6, "model_flops_per_token": 2e6, "span_avg": 100.0, "span_max": 2100.0,
         "tokens_per_s": 1.0, "head_spans": [[2100, 40], [50, 60]] if r["config"] == A else None,
         "expire": r["config"] == E}
    curves = {"step": [5], "train_bpc": [3], "val_bpc": [3], "flops_step": [0], "attn_flops": [1e6],
              "span_step": [0], "head_spans": [[2100, 40, 50, 60]]}
    return {"result": r, "curves": curves, "seconds": {"train": 1.0, "eval": 1.0}}


def test_report_shows_the_reach_table(tmp_path):
    rs = [res(S, s, copied=3.0, octaves=octaves([3.0 + s / 10] * 4)) for s in (1, 2, 3)]
    rs += [res(E, s, copied=2.4, mem=[320, 64, 1000, 128], octaves=octaves([2.0, 2.5, 2.9, 2.5])) for s in (1, 2, 3)]
    timing = {"ms": {E: 123.4, S: 50.0}, "cpu_ms": {E: 120.0, S: 49.0}, "steps": 10, "load_before": 0.2,
              "load_after": 0.3, "process_peak_mb": 900.0,
              "models": {E: {"span_avg": 900.0, "attn_impl": "grouped", "mem_layers": [640, 1152]},
                         S: {"span_avg": None, "attn_impl": "grouped"}}}
    records = [record(r) for r in rs]
    verdicts = sc.evaluate(sc.CRITERIA["longrange"], rs, timing)
    study_report.write(records, tmp_path, "longrange", "note", "python scripts/study.py ...", 18, verdicts, timing)
    report = (tmp_path / "report.md").read_text()
    assert "## How far back each method reaches on copied positions" in report
    assert "| configuration | reach (tokens) | copied bpc | ordinary bpc | 64-127 | 128-255 | 256-511 | 512-1023 |" in report
    section = report.split("## How far back")[1].split("## Every run")[0]
    row = next(l for l in section.splitlines() if l.startswith(f"| {E} | "))
    assert row.startswith(f"| {E} | 1024 | 2.400 ± 0.000 (n=3) |") and "| 123.4 |" in row
    assert "320/64/1000/128" in row and f"(dropped {100 * (1 - 378 / D):.0f}%)" in row
    assert "**Verdict: supported.** kept memory per layer" in report  # E1 on these memories
    assert f"{E} 123.4 ms (CPU 120.0 ms, span avg 900, kept memory 640/1152, grouped path)" in report
    if (tmp_path / study_reach.FIGURE).exists():  # matplotlib installed
        assert study_reach.FIGURE in report


def write_folder(folder: Path) -> None:
    """A reference-format byte folder: each byte as its decimal value."""
    rng = random.Random(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    folder.mkdir()
    for split, size in (("train", 6000), ("valid", 600), ("test", 600)):
        raw = " ".join(rng.choice(words) for _ in range(size // 3)).encode()[:size]
        (folder / f"{split}.txt").write_text(" ".join(str(b) for b in raw))


def test_an_expire_checkpoint_is_recorded_and_timed(tmp_path):
    import study_run
    import study_timing
    from data import DataConfig, load_corpus
    write_folder(tmp_path / "data")
    ckpt = tmp_path / "model.pt"
    flags = ["--nlayers", "2", "--hid-sz", "16", "--inner-hid-sz", "32", "--nheads", "2", "--block-sz", "8",
             "--batch-sz", "2", "--attn-span", "8", "--expire-span", "--attn-lim", "32", "--expire-span-ramp", "8",
             "--nbatches", "8", "--niter", "2", "--lr", "0.01"]
    proc = subprocess.run([sys.executable, "main.py", *flags, "--data", str(tmp_path / "data"), "--checkpoint",
                           str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = sp.Run("expire-32-s1", "expire-32", 1, 32, False, 0, [], expire=True)
    memory = study_run.expire_figures(run, study_run.read_metrics(tmp_path / "model.logs"))
    logged = [l for l in proc.stdout.splitlines() if " mem: " in l][-1]
    assert "/".join(map(str, memory["mem_layers"])) == logged.split(" mem: ")[1].split()[0]
    assert memory["mem_avg"] == mean(memory["mem_layers"]) and memory["dropped_frac"] == 1 - memory["mem_avg"] / 32
    kept = study_run.model_figures(run, ckpt, memory["mem_layers"])["attn_flops_per_token"]
    longest = study_run.model_figures(run, ckpt)["attn_flops_per_token"]
    assert kept <= longest
    step, info = study_timing.training_step(ckpt, load_corpus(DataConfig(str(tmp_path / "data"))).split("train"))
    assert len(info["mem_layers"]) == 2 and all(0 < m <= 32 + 8 + 8 for m in info["mem_layers"])
    step()
    step()  # the memory carried between steps
