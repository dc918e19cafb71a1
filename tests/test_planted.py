"""The planted long-range corpus (planted.py, scripts/plant_repeats.py) and the scoring of
copied and ordinary positions (copy_score.py), on text the tests generate."""
import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import copy_score
import planted
from data import DataConfig, load_corpus
from datagen import english, reference_enwik8, write_zip
from models import ModelConfig, TransformerSeq
from trainer import evaluate
from utils import ConfigError, DistInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import plant_repeats  # noqa: E402

D = 1024
FLAGS = ["--max-distance", str(D), "--copy-len", "8", "24", "--copy-fraction", "0.25",
         "--test-size", "12000", "--seed", "3"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "text.txt"
    path.write_bytes(english(100_000, seed=5))
    return path


@pytest.fixture(scope="module")
def corpus(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted") / "p"
    assert plant_repeats.main([str(source), str(out), *FLAGS]) == 0
    return out


def source_splits(data: bytes, n: int) -> dict:
    return {"train": data[:-2 * n], "valid": data[-2 * n:-n], "test": data[-n:]}


def test_every_listed_copy_repeats_the_text_at_its_distance(corpus, source):
    side = planted.read_side_file(corpus)
    originals = source_splits(source.read_bytes(), 12000)
    for name in planted.SPLITS:
        raw = np.frombuffer((corpus / f"{name}.txt.raw").read_bytes(), dtype=np.uint8)
        assert side["tokens"][name] == len(raw)
        listed = np.zeros(len(raw), dtype=bool)
        for start, length, distance in side[name]:
            assert 64 <= distance <= D and 8 <= length <= 24 and distance <= start
            for q in range(start, start + length):  # token by token, a plain loop
                assert raw[q] == raw[q - distance], (name, q, distance)
            assert not listed[start:start + length].any()  # runs do not overlap
            listed[start:start + length] = True
        # what is not listed is the source split itself, in order: no planted token is left out
        assert raw[~listed].tobytes() == originals[name]
        assert 0.18 < listed.mean() < 0.32


def test_the_prepared_files_read_back_as_the_planted_stream(corpus, tmp_path):
    for name in planted.SPLITS:
        raw = (corpus / f"{name}.txt.raw").read_bytes()
        assert (corpus / f"{name}.txt").read_bytes() == reference_enwik8(raw)
    loaded = load_corpus(DataConfig(str(corpus), cache_dir=str(tmp_path)))
    side = planted.read_side_file(corpus)
    for name in planted.SPLITS:
        ids = loaded.split(name).astype(np.int64)
        assert len(ids) == side["tokens"][name] + 1  # the reader's final <eos>
        dist = planted.copy_distances(side[name], len(ids))
        where = np.flatnonzero(dist)
        assert where.size and (ids[where] == ids[where - dist[where]]).all()
    info = json.loads((corpus / ".prepared.json").read_text())
    assert info["plant"]["max_distance"] == D and info["plant"]["seed"] == 3


def test_the_same_seed_gives_the_same_files_and_another_seed_others(corpus, source, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert plant_repeats.main([str(source), str(again), *FLAGS]) == 0
    assert plant_repeats.main([str(source), str(other), *FLAGS[:-1], "4"]) == 0
    for name in ["copies.json", *(f"{s}.txt" for s in planted.SPLITS)]:
        assert (again / name).read_bytes() == (corpus / name).read_bytes()
    assert (other / "copies.json").read_bytes() != (corpus / "copies.json").read_bytes()


def test_a_zip_with_one_member_is_read_like_the_text(source, corpus, tmp_path):
    archive = write_zip(tmp_path / "text.zip", {"text": source.read_bytes()})
    assert plant_repeats.main([str(archive), str(tmp_path / "z"), *FLAGS]) == 0
    assert (tmp_path / "z" / "copies.json").read_bytes() == (corpus / "copies.json").read_bytes()


def test_distances_are_log_uniform_over_the_range():
    cfg = planted.PlantConfig(min_distance=64, max_distance=4096, min_len=4, max_len=8, fraction=0.3, seed=1)
    src = np.frombuffer(english(300_000, seed=1), dtype=np.uint8)
    _, runs = planted.plant(src, cfg, random.Random(7))
    logs = np.log([d for start, _, d in runs if start > 4096])  # past the first D tokens nothing is skipped
    assert len(logs) > 5000
    counts, _ = np.histogram(logs, bins=6, range=(math.log(64), math.log(4097)))
    expected = len(logs) / 6
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected)), counts  # a flat histogram
    assert min(d for *_, d in runs) >= 64 and max(d for *_, d in runs) <= 4096


@pytest.mark.parametrize("flags, says", [
    (["--max-distance", "32"], "--max-distance 32"),
    (["--copy-len", "9", "3"], "--copy-len 9 3"),
    (["--copy-fraction", "1.5"], "--copy-fraction 1.5"),
    (["--test-size", "60000"], "--test-size 60000"),
])
def test_bad_settings_are_one_error_line_and_nothing_is_written(source, tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    assert plant_repeats.main([str(source), str(out), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plant_repeats.py: error:") and says in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_and_left_alone(source, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert plant_repeats.main([str(source), str(tmp_path / "out")]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_a_folder_without_side_file_is_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError, match="copies.json: no such file"):
        planted.read_side_file(tmp_path)


# ---- scoring ---------------------------------------------------------------------
def test_score_splits_positions_as_a_plain_loop_does():
    rng = np.random.RandomState(0)
    n = 400
    nll = rng.rand(n) * 3
    nll[0] = np.nan
    runs = [[70, 10, 64], [150, 30, 100], [300, 20, 250]]
    dist = planted.copy_distances(runs, n)
    row_start = np.where(np.arange(n) < 200, 0, 199)  # two rows; the second starts at 199
    got = copy_score.score(nll, dist, row_start)
    sums = {"ordinary": [], "copied": [], "copied_unseen": []}
    for t in range(1, n):
        d = dist[t]
        key = "ordinary" if d == 0 else "copied" if t - d >= row_start[t] else "copied_unseen"
        sums[key].append(nll[t])
    for key, values in sums.items():
        assert got[key]["tokens"] == len(values)
        assert got[key]["bpc"] == pytest.approx(sum(values) / len(values) / math.log(2))
    assert got["copied_unseen"]["tokens"] == 20  # 300 - 250 < 199
    assert got["copied_64-127"]["tokens"] == 40 and got["copied_64-127"]["bpc"] == pytest.approx(
        np.mean(nll[[*range(70, 80), *range(150, 180)]]) / math.log(2))


@torch.no_grad()
def test_token_nll_adds_up_to_the_whole_set_evaluation():
    cfg = ModelConfig(vocab_size=11, hidden_size=16, inner_hidden_size=32, nlayers=2, nheads=2,
                      attn_span=24, dropout=0.0, adapt_span=True, adapt_span_init=0.5)
    torch.manual_seed(0)
    model = TransformerSeq(cfg).eval()
    ids = np.random.RandomState(3).randint(0, 11, 203)
    nll, row_start = copy_score.token_nll(model, ids, batch_size=3, block=8)
    mean, count = evaluate(model, model, ids, batch_size=3, block=8, dist=DistInfo())
    assert np.isnan(nll[0]) and not np.isnan(nll[1:]).any() and count == 202
    assert nll[1:].sum() == pytest.approx(mean * count, rel=1e-6)
    assert sorted(set(row_start[1:].tolist())) == [0, 68, 135]  # rows of 68, 67, 67 targets
    # the first target of the second row is scored from an empty cache, as a plain stream
    first, _ = model(torch.tensor([[ids[68]]]), model.init_cache(1), torch.tensor([[ids[69]]]))
    assert nll[69] == pytest.approx(first.item(), rel=1e-5)


def test_score_copies_script_groups_the_whole_set_evaluation(corpus, tmp_path, capsys, monkeypatch):
    import main
    import score_copies
    monkeypatch.setenv("ADAPTIVE_SPAN_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "run.pt"
    tiny = ("--nlayers 2 --hid-sz 16 --inner-hid-sz 32 --nheads 2 --attn-span 256 --block-sz 16 --batch-sz 4 "
            "--dropout 0 --adapt-span --adapt-span-init 0.5 --nbatches 3 --niter 1").split()
    assert main.main(["--data", str(corpus), "--checkpoint", str(ckpt), *tiny]) == 0
    assert main.main(["--checkpoint", str(ckpt), "--full-eval-mode", "--batch-sz", "4"]) == 0
    whole = re.search(r"^val: ([\d.]+)bpc tokens: (\d+)", capsys.readouterr().out, re.M)
    assert score_copies.main(["--checkpoint", str(ckpt), "--batch-sz", "4"]) == 0
    found = {name: (float(bpc), int(n)) for name, bpc, n in
             re.findall(r"^valid (\S+): ([\d.na]+)bpc tokens: (\d+)", capsys.readouterr().out, re.M)}
    parts = [found[k] for k in ("ordinary", "copied", "copied_unseen")]
    assert sum(n for _, n in parts) == int(whole.group(2)) == planted.read_side_file(corpus)["tokens"]["valid"]
    assert sum(b * n for b, n in parts) / int(whole.group(2)) == pytest.approx(float(whole.group(1)), abs=2e-4)
    octaves = [v for k, v in found.items() if k.startswith("copied_") and k != "copied_unseen"]
    assert sum(n for _, n in octaves) == found["copied"][1] > 0

    other = tmp_path / "other"
    other.mkdir()
    for name in planted.SPLITS:
        (other / f"{name}.txt").write_bytes((corpus / f"{name}.txt").read_bytes()[:-2])
    (other / "copies.json").write_bytes((corpus / "copies.json").read_bytes())
    assert score_copies.main(["--checkpoint", str(ckpt), "--data", str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the data" in err[0] and str(other) in err[0]
