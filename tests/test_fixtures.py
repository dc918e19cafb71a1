"""Checkpoints written by the reference implementation, with the scores it printed for them."""
import json
import re
import shutil

import pytest
import torch

import main
from build import build_model
from checkpoint import load_checkpoint
from settings import Settings
from train_state import load_model_state
from datagen import fixture_folder
from models import ATTN_IMPLS

NAMES = ["F1-text8-span", "F2-enwik8-pers-span", "F4-text8-varied-spans"]


@pytest.fixture
def fixture(reference_data):
    """name -> (fixture folder, expected.json, a writable copy of its data); skips, naming
    ../shared/data/fixtures, when the fixtures are absent."""
    def get(name):
        folder = fixture_folder(name)
        expected = json.loads((folder / "expected.json").read_text())
        _, data = reference_data(name, expected.get("data", "data"))
        return folder, expected, data
    return get


def build(folder, expected, data, *extra):
    parser = main.build_parser()
    args = parser.parse_args(expected["flags"].split() + ["--data", str(data)] + list(extra))
    model, _ = build_model(Settings.from_args(args), len(expected["vocab_idx2word"]), "cpu")
    load_model_state(model, load_checkpoint(folder / "checkpoint.pt"), folder / "checkpoint.pt")
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_reference_eval_reproduces_the_printed_scores(name, capsys, fixture, tmp_path):
    folder, expected, data = fixture(name)
    ckpt = tmp_path / "checkpoint.pt"
    shutil.copyfile(folder / "checkpoint.pt", ckpt)
    argv = expected["flags"].split() + ["--data", str(data), "--checkpoint", str(ckpt),
                                        "--full-eval-mode", "--batch-sz", "8", "--reference-eval"]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    scores = dict(re.findall(r"^(val|test): (\d+\.\d{4})bpc", out, re.M))
    printed = expected["reference_full_eval"]["batch_sz_8"]
    assert float(scores["val"]) == pytest.approx(printed["val"], abs=0.001)
    assert float(scores["test"]) == pytest.approx(printed["test"], abs=0.001)


@pytest.mark.parametrize("impl", sorted(ATTN_IMPLS))
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_per_token_log_probabilities_match(name, impl, fixture):
    folder, expected, data = fixture(name)
    model = build(folder, expected, data, "--attn-impl", impl)
    stream = expected["stream"]
    ids = torch.tensor(stream["token_ids"])
    block = int(re.search(r"--block-sz (\d+)", expected["flags"]).group(1))
    cache, logprobs = model.init_cache(1), []
    for pos in range(0, len(ids) - 1, block):
        x, y = ids[pos:pos + block][None], ids[pos + 1:pos + block + 1][None]
        nll, cache = model(x[:, :y.size(1)], cache, y)
        logprobs.append(-nll[0])
    ours = torch.cat(logprobs).double()
    theirs = torch.tensor(stream["target_logprob"], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)
    assert -ours.sum().item() == pytest.approx(stream["nll_sum_nats"], rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_spans_and_state_dict_names(name, fixture):
    folder, expected, data = fixture(name)
    model = build(folder, expected, data)
    spans = [torch.tensor(v) for v in expected["spans_current_val"]]
    for layer, values in zip(model.layers, spans):
        torch.testing.assert_close(layer.span.current_val.detach().view(-1), values)
    ours = set(model.state_dict())
    theirs = {e["key"].removeprefix("module.") for e in expected["state_dict"]}
    # ours registers the span tensors once; the reference repeats them under persistent_memory
    assert ours == {k for k in theirs if "persistent_memory.adaptive_span" not in k}


def test_reference_checkpoint_resumes_training(tmp_path, fixture):
    folder, expected, data = fixture("F1-text8-span")
    ckpt = tmp_path / "ref.pt"
    ckpt.write_bytes((folder / "checkpoint.pt").read_bytes())
    flags = expected["flags"].split()
    flags[flags.index("--niter") + 1] = "16"  # the reference stopped after iteration 14 of 15
    flags[flags.index("--nbatches") + 1] = "5"
    argv = flags + ["--data", str(data), "--checkpoint", str(ckpt), "--lr", "0.007"]
    assert main.main(argv) == 0
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iter_no"] == 15 and saved["step"] == 1505  # the warm-up count continues
    assert saved["logger"]["step"][:15] == expected_steps(expected) and saved["logger"]["step"][-1] == 1505
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.007)


def expected_steps(expected):
    return [100 * (i + 1) for i in range(expected["iter_no"] + 1)]
