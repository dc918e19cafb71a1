"""scripts/study.py: the quick grid end to end on generated data (capped at 2 steps per run),
results.json's keys and types, skipping and resuming on a rerun, the gpu preset's dry run.

The data is written by the test (a reference-format folder of byte tokens), so nothing here
needs ../shared.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "scripts" / "study.py"
sys.path.insert(0, str(ROOT / "scripts"))

import study_criteria  # noqa: E402
import study_report  # noqa: E402
CONFIGS = ["fixed-64", "fixed-256", "fixed-1024", "adaptive-256", "adaptive-1024", "adaptive-8192",
           "allattn-8192"]
NAMES = [f"{c}-s1" for c in CONFIGS]  # the quick preset: one seed
KEYS = ["name", "config", "seed", "max_span", "adaptive", "pers_mem_size", "params", "steps", "dev_bpc",
        "test_bpc", "copied_bpc", "ordinary_bpc", "attn_flops_per_token", "model_flops_per_token",
        "tokens_per_s", "peak_mem_mb", "span_avg", "span_max", "head_spans", "expire", "mem_layers", "mem_avg",
        "mem_max", "dropped_frac", "octave_bpc"]
CPU_SHAPE = {"nlayers": 4, "hidden": 128, "nheads": 4}  # the quick preset's model


def study(*args, timeout=600):
    return subprocess.run([sys.executable, str(STUDY), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_byte_folder(folder: Path, sizes=(("train", 30000), ("valid", 2500), ("test", 2500))) -> None:
    """A reference-format enwik8-style folder: every byte as its decimal value, a newline byte as a line break."""
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "<page>", "[[link]]"]
    folder.mkdir(parents=True)
    for split, size in sizes:
        lines = []
        while sum(len(line) for line in lines) < size:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".\n")
        raw = "".join(lines).encode()[:size]
        (folder / f"{split}.txt").write_text(" ".join("\n" if b == 10 else str(b) for b in raw))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    data, out = tmp / "data", tmp / "out"
    write_byte_folder(data)
    proc = study("--preset", "quick", "--data", data, "--out", out, "--jobs", 2, "--max-steps", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return data, out, proc.stdout


def test_quick_grid_results(quick):
    _, out, stdout = quick
    finished = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(finished) == 7 and all("dev" in line and "FAILED" not in line for line in finished)
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == NAMES
    for r in results:
        assert list(r) == KEYS
        assert r["steps"] == 2 and isinstance(r["params"], int) and isinstance(r["adaptive"], bool)
        for key in ("dev_bpc", "test_bpc", "attn_flops_per_token", "model_flops_per_token", "tokens_per_s",
                    "peak_mem_mb", "span_avg", "span_max"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert r["config"] == r["name"][:-3] and r["seed"] == 1 and r["copied_bpc"] is None
        assert r["expire"] is False and r["mem_layers"] is None and r["octave_bpc"] is None
        assert 0 < r["dev_bpc"] < 9 and 0 < r["test_bpc"] < 9  # 256 symbols at most: 8 bits
        if r["adaptive"]:
            spans = r["head_spans"]
            assert len(spans) == (6 if r["pers_mem_size"] else 4) and all(len(l) == 4 for l in spans)
            assert all(isinstance(s, int) and 1 <= s <= r["max_span"] for l in spans for s in l)
            assert r["span_max"] == max(max(l) for l in spans)
        else:
            assert r["head_spans"] is None and r["span_avg"] == r["span_max"] == r["max_span"]
            # content, position and value products over L keys, 2 FLOPs each: 3 * 2 * D * L per head
            D = CPU_SHAPE["hidden"] // CPU_SHAPE["nheads"]
            assert r["attn_flops_per_token"] == 3 * 2 * D * r["max_span"] * CPU_SHAPE["nheads"] * CPU_SHAPE["nlayers"]
    by_name = {r["config"]: r for r in results}
    assert by_name["allattn-8192"]["pers_mem_size"] == 256
    ratio = by_name["allattn-8192"]["params"] / by_name["adaptive-8192"]["params"]
    assert 0.97 < ratio < 1.03  # about the same size


def test_quick_report_and_figures(quick):
    _, out, _ = quick
    report = (out / "report.md").read_text()
    criteria = json.loads((out / "criteria.json").read_text())
    assert [c["key"] for c in criteria] == [c.key for c in study_criteria.CRITERIA["quick"]]
    assert "## Criteria and verdicts" in report and report.count("**Verdict: ") == len(criteria)
    assert all(f"### {c['key']} " in report and c["rule"] in report for c in criteria)
    # one seed: no measured spread, so every margin verdict cannot test
    verdicts = {v["key"]: v for v in json.loads((out / "verdicts.json").read_text())}
    assert verdicts["3-allattn-matches"]["verdict"] == "cannot test"
    assert "within 0.02" in report and "no more than 0.02 worse" in report  # the earlier change, named
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing["ms"]) == {"adaptive-256", "adaptive-8192"} and "Timing phase" in report
    assert "tokens/s" not in report.split("## Every run")[1].split("\n")[2]  # no tokens/s column
    assert all(f"| {name} |" in report for name in NAMES)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in report
        return
    for key, name in study_report.FIGURES.items():
        png = out / name
        if key == "f":  # copied bpc per distance octave: a planted corpus only
            assert not png.exists() and f"({name})" not in report
            continue
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name})" in report


def test_rerun_skips_finished_and_resumes(quick):
    data, out, _ = quick
    before = (out / "results.json").read_text()
    stamps = {n: (out / "runs" / n / "model.pt").stat().st_mtime_ns for n in NAMES}
    proc = study("--preset", "quick", "--data", data, "--out", out, "--max-steps", 2)
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("skip ") for line in proc.stdout.splitlines()) == 7
    assert not any(line.startswith("[") for line in proc.stdout.splitlines())
    assert (out / "results.json").read_text() == before
    # a run whose record is lost is resumed from its finished checkpoint: evaluated again, not retrained
    (out / "runs" / "fixed-64-s1" / "record.json").unlink()
    proc = study("--preset", "quick", "--data", data, "--out", out, "--max-steps", 2)
    assert proc.returncode == 0, proc.stderr
    assert [l.split(":")[0] for l in proc.stdout.splitlines() if l.startswith("[")] == ["[7/7] fixed-64-s1"]
    assert {n: (out / "runs" / n / "model.pt").stat().st_mtime_ns for n in NAMES} == stamps
    assert json.loads((out / "results.json").read_text()) == json.loads(before)


def test_other_flags_in_the_same_out_is_an_error(quick):
    data, out, _ = quick
    before = (out / "results.json").read_text()
    proc = study("--preset", "quick", "--data", data, "--out", out, "--max-steps", 3)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --out") and proc.stderr.count("\n") == 1
    assert (out / "results.json").read_text() == before


def test_missing_data_is_an_error(tmp_path):
    proc = study("--preset", "quick", "--data", tmp_path / "nothing", "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --data")
    assert not (tmp_path / "out").exists()


def test_gpu_dry_run_prints_each_runs_flags(tmp_path):
    proc = study("--preset", "gpu", "--data", tmp_path / "enwik8", "--out", tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    train = [l.strip() for l in lines if l.strip().startswith("torchrun")]
    assert len(train) == 7 and all("--nproc_per_node=8 main.py" in l and "--distributed" in l for l in train)
    assert sum("--full-eval-mode --batch-sz 8" in l for l in lines) == 7
    pers = [l for l in train if "--pers-mem-size 1024" in l]
    ff = [l for l in train if "--pers-mem-size" not in l]
    assert len(pers) == 1 and len(ff) == 6
    assert all("--nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --nheads 8 --block-sz 512" in l for l in ff)
    assert "--nlayers 18 --hid-sz 512 --inner-hid-sz 1 --nheads 8 --block-sz 512" in pers[0]
    assert pers[0].count("--nlayers") == 1 and "--batch-split 2" in pers[0]
    assert pers[0].endswith(f"--attn-span 8192 --adapt-span --adapt-span-cache --adapt-span-init 0 "
                            f"--adapt-span-loss 5e-7 --data {tmp_path / 'enwik8'} --checkpoint "
                            f"{tmp_path / 'out' / 'runs' / 'allattn-8192-s1' / 'model.pt'} --distributed")
    params = {l.split(" ")[0]: int(l.split("params ")[1].split(" ")[0].replace(",", ""))
              for l in lines if "(params" in l}
    assert list(params) == NAMES
    assert abs(params["allattn-8192-s1"] / params["adaptive-8192-s1"] - 1) < 0.05
    assert not (tmp_path / "out").exists()


def test_report_only_trains_nothing(quick):
    data, out, _ = quick
    before = (out / "results.json").read_text()
    (out / "report.md").unlink()
    stamps = {n: (out / "runs" / n / "model.pt").stat().st_mtime_ns for n in NAMES}
    proc = study("--preset", "quick", "--data", data, "--out", out, "--max-steps", 2, "--report-only")
    assert proc.returncode == 0, proc.stderr
    assert not any(line.startswith(("[", "skip")) for line in proc.stdout.splitlines())
    assert (out / "results.json").read_text() == before and (out / "report.md").exists()
    assert {n: (out / "runs" / n / "model.pt").stat().st_mtime_ns for n in NAMES} == stamps


def test_dry_run_counts_parameters_with_the_vocabulary_of_the_data(tmp_path):
    """Not enwik8's 205 symbols for any data: the data's own vocabulary, read as main.py reads it."""
    from data import DataConfig, load_corpus
    write_byte_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    vocab = len(load_corpus(DataConfig(str(tmp_path / "data"), cache_dir=str(cache))).vocab)
    proc = subprocess.run([sys.executable, str(STUDY), "--preset", "quick", "--data", str(tmp_path / "data"),
                           "--out", str(tmp_path / "out"), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "ADAPTIVE_SPAN_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert vocab < 205 and f"with vocabulary {vocab}, of {tmp_path / 'data'}" in proc.stdout
