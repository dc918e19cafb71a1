"""The house rules: each setting defined once (config.py), a train state that gives and takes
its whole state, no import circle among the root modules, short files and functions, and a
--help that loads nothing heavy."""
import ast
import io
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import config
import flags
import main
from config import DataConfig, ModelConfig, RunConfig, TrainConfig
from errors import ConfigError
from settings import SECTIONS, Settings, all_flag_fields, dest

ROOT = Path(__file__).resolve().parents[1]
ROOT_MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


# ---- one source for every setting ---------------------------------------------------------
def test_every_flag_default_is_its_field_default():
    parsed = vars(flags.build_parser().parse_args([]))
    defaults = Settings(DataConfig(), ModelConfig(), TrainConfig(), RunConfig())
    for section, f in all_flag_fields():
        assert parsed[dest(f)] == getattr(getattr(defaults, section), f.name), f.metadata["flag"]
    assert Settings.from_args(flags.build_parser().parse_args([])) == defaults
    assert set(parsed) == {dest(f) for _, f in all_flag_fields()}  # no flag outside config.py


def test_every_field_but_the_derived_ones_is_a_flag_in_a_known_group():
    titles = [title for title, _ in config.GROUPS]
    derived = {("data", "sort_by_freq"), ("model", "vocab_size")}
    for name, cls in SECTIONS:
        for f in fields(cls):
            if (name, f.name) in derived:
                assert "flag" not in f.metadata
                continue
            assert f.metadata["group"] in titles and f.metadata["help"], f.name
    dests = [dest(f) for _, f in all_flag_fields()]
    assert len(dests) == len(set(dests))


def test_explicit_flags_are_those_given():
    argv = ["--hid-sz", "32", "--adapt-span", "--data-split", "0.8", "0.1", "0.1", "--local-rank", "1"]
    assert flags.explicit_flags(argv) == {"hid_sz", "adapt_span", "data_split", "local_rank"}
    assert flags.explicit_flags(["--prompt", "abc", "--lr=0.5"]) == {"lr"}  # other flags are ignored
    assert flags.explicit_flags([]) == set()


def settings_of(*argv) -> Settings:
    return Settings.from_args(flags.build_parser().parse_args(list(argv)))


def test_stored_configuration_merges_back():
    trained = settings_of("--hid-sz", "32", "--nheads", "4", "--adapt-span", "--lr", "0.1",
                          "--data", "corpus.txt", "--data-split", "0.8", "0.1", "0.1", "--dropout", "0.3")
    trained.model.vocab_size = 7
    stored = trained.stored(data_is_file=True)
    assert set(stored) == {"model", "train", "data"} and set(stored["data"]) == {"path", "unit", "split"}
    resumed = settings_of("--lr", "0.2", "--dropout", "0.1", "--checkpoint", "c.pt")
    resumed.merge_saved(stored, {"lr", "dropout", "checkpoint"}, "c.pt")
    assert (resumed.model.hidden_size, resumed.model.nheads, resumed.model.adapt_span) == (32, 4, True)
    assert (resumed.train.lr, resumed.model.dropout) == (0.2, 0.1)  # may change on resume
    assert resumed.data.path == "corpus.txt" and resumed.data.split == [0.8, 0.1, 0.1]
    assert resumed.model.vocab_size == 0 and resumed.run.checkpoint == "c.pt"  # neither is merged
    for argv, text in ((["--hid-sz", "64"], "--hid-sz 64 contradicts the checkpoint c.pt, which was "
                                            "trained with --hid-sz 32"),
                       (["--data-split", "0.9", "0.05", "0.05"], "--data-split 0.9 0.05 0.05 contradicts"),
                       (["--adapt-span-cache"], "--adapt-span-cache contradicts the checkpoint c.pt, "
                                                "which was trained without it")):
        with pytest.raises(ConfigError, match=text):
            settings_of(*argv).merge_saved(stored, flags.explicit_flags(argv), "c.pt")
    older = {"model": {"hidden_size": 32}, "data": {"path": "x", "unit": "bpc"}}  # fields added since
    merged = settings_of("--data-split", "0.7", "0.2", "0.1")
    merged.merge_saved(older, {"data_split"}, "old.pt")
    assert merged.model.hidden_size == 32 and merged.data.split == [0.7, 0.2, 0.1]
    assert trained.stored(data_is_file=False)["data"]["split"] is None


@pytest.mark.parametrize("argv,message", [
    (["--nheads", "0"], "--nheads must be at least 1, got 0"),
    (["--pers-mem-size", "-3"], "--pers-mem-size must not be negative, got -3"),
    (["--dropout", "1"], "--dropout is a probability in [0, 1), got 1.0"),
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--adapt-span-init", "2"], "--adapt-span-init is a fraction of --attn-span in [0, 1], got 2.0"),
    (["--adapt-io-cutoffs", "5", "0"], "--adapt-io-cutoffs must be positive, got 5 0"),
    (["--data-split", "0.5", "0.3", "0.3"], "--data-split 0.5 0.3 0.3: give three positive fractions"),
    (["--threads", "-1"], "--threads must not be negative, got -1"),
])
def test_each_field_rule_names_its_flag(argv, message):
    with pytest.raises(ConfigError) as err:
        settings_of(*argv).check_ranges()
    assert str(err.value).startswith(message)
    settings_of().check_ranges()  # the defaults pass


def test_help_loads_nothing_heavy():
    code = ("import sys; sys.argv = ['main.py', '--help']; import main\n"
            "try:\n    main.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'tensorboard', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("[]"), out.stdout[-300:] + out.stderr[-300:]
    assert "scripts/launch_ranks.py" in out.stdout and "torchrun" not in out.stdout


# ---- the sizes (the import graph: tests/test_imports.py) ---------------------------------------------------------
def test_main_is_wiring_and_files_and_functions_are_short():
    assert len((ROOT / "main.py").read_text().splitlines()) <= 200
    for m in ROOT_MODULES:
        assert len((ROOT / f"{m}.py").read_text().splitlines()) <= 400, m
    for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        if not path.name.startswith("study"):  # scripts/study*.py: not yet under the limit
            assert len(path.read_text().splitlines()) <= 400, path.name
    for path in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 50, f"{path.name}: {node.name}"


def test_main_keeps_its_entry_points():
    assert callable(main.main) and callable(main.build_parser)


# ---- the train state -------------------------------------------------------------------------
def tiny_state(seed_steps: int = 0):
    import numpy as np
    import torch

    from build import build_model
    from data import Corpus, Vocab
    from train_state import TrainState
    from utils import DistInfo, seed_everything
    s = settings_of("--nlayers", "2", "--hid-sz", "16", "--inner-hid-sz", "16", "--nheads", "2",
                    "--attn-span", "16", "--block-sz", "8", "--batch-sz", "2", "--nbatches", "4",
                    "--adapt-span", "--dropout", "0.3", "--optim", "adagrad", "--lr", "0.05")
    ids = np.random.RandomState(0).randint(0, 9, 300)
    corpus = Corpus(Vocab([chr(97 + i) for i in range(9)], "chars"), ids, ids[:120], ids[:50],
                    fingerprint={"size": 300, "sha256": "x"})
    model, _ = build_model(s, 9, torch.device("cpu"))
    seed_everything(s.train.seed, 0)
    state = TrainState(s, model, model, corpus, DistInfo())
    for _ in range(seed_steps):
        state.trainer.train_step()
    return state


def test_train_state_gives_and_takes_its_whole_state():
    """Three steps then a state round trip: the copy's next steps equal the original's."""
    import torch
    state = tiny_state(3)
    state.done, state.history = 1, {"step": [3]}
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)  # as a checkpoint file holds it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["config"]["model"]["vocab_size"] == 9 and saved["config"]["data"]["fingerprint"]["size"] == 300
    assert saved["vocab"] == {"idx2word": state.vocab.idx2word, "style": "chars"} and saved["iter_no"] == 0
    caches = [c.clone() for c in state.trainer.train_cache]
    losses = [state.trainer.train_step()["loss"] for _ in range(2)]  # the random states are global:
    copy = tiny_state(0)  # the original goes on first, then a fresh state takes the saved one
    copy.load_state_dict(saved, "memory")
    assert (copy.step, copy.done, copy.history, copy.trainer.iter_step) == (3, 1, {"step": [3]}, 3)
    for a, b in zip(copy.trainer.train_cache, caches):
        torch.testing.assert_close(a, b)
    assert [copy.trainer.train_step()["loss"] for _ in range(2)] == losses
    for p, q in zip(copy.model.parameters(), state.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    other = tiny_state(0)
    other.settings.train.batch_size = 4
    with pytest.raises(ConfigError, match="--batch-sz 4 differs from the checkpoint's 2"):
        other.load_state_dict(saved, "memory")
