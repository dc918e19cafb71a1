"""Expire span in main.py: the auxiliary loss trains, the log line and history report the spans
and memory lengths, the variable-length memory resumes bitwise, evaluation scores every token."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from expire_span import unpack  # noqa: E402

NB, NITER = 6, 4
MODEL = ["--nlayers", "2", "--hid-sz", "32", "--inner-hid-sz", "64", "--nheads", "2", "--attn-span", "16",
         "--block-sz", "8", "--batch-sz", "4", "--batch-split", "2", "--dropout", "0.1", "--expire-span", "--attn-lim", "96",
         "--expire-span-ramp", "8", "--expire-span-loss", "1e-3", "--expire-span-init-percentage", "0.15",
         "--expire-span-noisy", "--optim", "adam", "--lr", "0.003", "--nbatches", str(NB), "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LINE = re.compile(r"^steps: (\d+) .* span_avg: (\S+) span_max: (\S+) mem: (\S+) attn_flops/tok: (\S+) ")


def run(data, ckpt, niter, *extra):
    cmd = [sys.executable, "main.py", "--data", str(data), *MODEL, "--niter", str(niter),
           "--checkpoint", str(ckpt), *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("expire") / "run.pt"
    return ckpt, run(data, ckpt, NITER)


def test_log_lines_report_spans_and_memory_per_layer(straight):
    ckpt, stdout = straight
    lines = [m for m in map(LINE.match, stdout.splitlines()) if m]
    assert [int(m[1]) for m in lines] == [NB * (i + 1) for i in range(NITER)]
    state = load(ckpt)
    memories = state["ranks"][0]["train_cache"]
    assert lines[-1][4] == "/".join(str(m.size(1)) for m in memories)
    history = state["logger"]
    assert set(history) >= {"span_avg", "span_max", "mem_avg", "mem_max"}
    spans = torch.cat([unpack(m)[1].flatten() for m in memories])
    assert history["span_max"][-1] == pytest.approx(spans.max().item())
    assert 0 < history["span_avg"][-1] <= 96
    assert history["mem_max"][-1] == max(m.size(1) for m in memories) and history["mem_max"][-1] % 8 == 0


def test_tensorboard_gets_each_layer_span_and_memory_and_the_memory_figure(straight):
    ckpt, _ = straight
    folder = ckpt.with_name("run.logs")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    memories = load(ckpt)["ranks"][0]["train_cache"]
    last = records[-1]
    assert [last[f"span_mem/layer_{l:02d}"] for l in range(2)] == [m.size(1) for m in memories]
    assert last["span_max/layer_01"] == pytest.approx(unpack(memories[1])[1].max().item())
    assert last["flops/attn_flops"] < last["flops/attn_flops_max"]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert "expire/memory_ages" in events.Tags()["histograms"]
    if importlib.util.find_spec("matplotlib"):
        assert "expire/memory_figure" in events.Tags()["images"]


def test_resume_with_variable_memory_is_bitwise(straight, data, tmp_path):
    ckpt, _ = straight
    half = tmp_path / "half.pt"
    run(data, half, NITER // 2)
    run(data, half, NITER)
    got, want = load(half), load(ckpt)
    assert got["step"] == want["step"] and got["logger"] == want["logger"]
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    for key, state in want["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][key][name], value), (key, name)
    mine, theirs = got["ranks"][0]["train_cache"], want["ranks"][0]["train_cache"]
    assert [m.shape for m in mine] == [m.shape for m in theirs]
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    halfway = load(half.with_name("half.pt.prev"))["logger"]["mem_avg"]
    assert len(set(halfway)) > 1 or halfway[-1] != 8  # the memory length moved during training


def test_full_evaluation_scores_every_token(straight, data):
    ckpt, _ = straight
    out = subprocess.run([sys.executable, "main.py", "--data", str(data), "--checkpoint", str(ckpt),
                          "--full-eval-mode", "--batch-sz", "4"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = [int(m[1]) for m in re.finditer(r"tokens: (\d+)", out.stdout)]
    assert counts == [10_000 - 1, 10_000 - 1]  # 5% of 200,000 bytes each, all but the first
