"""scripts/smoke.py's pieces that do not need a GPU: the peak FLOP/s of a GPU by name, the
planner's plan text, reading main.py's last losses. (The whole CPU mode runs in CI after the
tests: .ci/run.)"""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import smoke  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402


def fake_torch(name: str):
    return types.SimpleNamespace(cuda=types.SimpleNamespace(get_device_name=lambda: name))


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA GeForce GTX 1080", None),
])
def test_gpu_peak_by_name(monkeypatch, name, peak):
    monkeypatch.delenv("SMOKE_PEAK_TFLOPS", raising=False)
    assert smoke.peak_flops(fake_torch(name), "cuda")[0] == peak
    monkeypatch.setenv("SMOKE_PEAK_TFLOPS", "100")
    assert smoke.peak_flops(fake_torch(name), "cuda") == (100e12, "SMOKE_PEAK_TFLOPS")


def test_plan_text_names_the_groups():
    model = TransformerSeq(ModelConfig(vocab_size=10, hidden_size=32, inner_hidden_size=32, nlayers=1,
                                       nheads=4, attn_span=512, adapt_span=True, adapt_span_cache=True))
    with torch.no_grad():
        model.layers[0].span.current_val.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]).view(-1, 1, 1))
    model.refresh_spans()
    text = smoke.plan_text(model, 8, 64)
    assert text.startswith("plan of layer 0: keeps 512 of 512 cached positions; window 64, chunk 64")
    assert text.endswith("heads 2-3") and text.count("window") == 2


def test_last_losses_or_the_failure_line():
    ok = subprocess.CompletedProcess([], 0, "steps: 5 train: 8.1bpc val: 7.7bpc ms/batch: 3\n"
                                            "steps: 10 train: 7.6bpc val: 6.6bpc ms/batch: 3\n", "")
    assert smoke.last_losses(ok) == ("10", "7.6bpc", "6.6bpc")
    bad = subprocess.CompletedProcess([], 2, "", "noise\nerror: --data x: no such file\n")
    with pytest.raises(RuntimeError, match="exit status 2: error: --data x"):
        smoke.last_losses(bad)
