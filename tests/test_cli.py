"""What main.py tells its user: --help by group with every default, the scripts' help, the
resume line, the warning for a slow CPU run, and progress lines when stdout is a file."""
import re
import sys
from pathlib import Path

import flags
import main
import train_log

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import generate  # noqa: E402

# the reference's flags: dest -> default (spelling, default and meaning are kept)
REFERENCE_DEFAULTS = {
    "data": "data/text8", "data_unit": "bpc", "hid_sz": 256, "inner_hid_sz": 1024, "nlayers": 8,
    "block_sz": 64, "nheads": 2, "attn_span": 32, "dropout": 0.2, "emb_dropout": 0.0, "lr": 0.03,
    "momentum": 0.9, "optim": "sgd", "lr_warmup": 0, "grad_clip": 0.0, "batch_sz": 64, "batch_split": 1,
    "nbatches": 1000, "niter": 1000, "checkpoint": "", "full_eval_mode": False, "adapt_io": False,
    "adapt_io_tied": False, "adapt_io_divval": 4, "adapt_io_cutoffs": [20000, 40000, 200000],
    "adapt_span": False, "adapt_span_loss": 0.0, "adapt_span_ramp": 32, "adapt_span_init": 0.0,
    "adapt_span_cache": False, "pers_mem_size": 0, "distributed": False, "local_rank": 0}
TINY = ["--nlayers", "1", "--hid-sz", "16", "--inner-hid-sz", "16", "--nheads", "2", "--attn-span", "16",
        "--block-sz", "8", "--batch-sz", "2", "--nbatches", "3", "--device", "cpu", "--dropout", "0"]


def listed_flags(help_text: str) -> list:
    return re.findall(r"^  (--[a-z-]+)", help_text, re.M)


def test_reference_flags_keep_their_defaults():
    args = vars(main.build_parser().parse_args([]))
    assert {k: args[k] for k in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS


def test_help_shows_every_flag_in_its_group_with_a_help_and_its_default():
    parser = main.build_parser()
    text = parser.format_help()
    titles = [title for title, _, _ in flags.FLAG_GROUPS]
    positions = [text.index(f"\n{title}:\n") for title in titles]
    assert positions == sorted(positions)  # the groups, in order
    grouped = {a.dest for g in parser._action_groups if g.title in titles for a in g._group_actions}
    for action in parser._actions:
        if action.dest == "help" or action.help == "==SUPPRESS==":
            continue
        assert action.dest in grouped, action.option_strings
        assert action.help, action.option_strings
    for flag, default in (("--lr", "0.03"), ("--adapt-io-cutoffs", "20000 40000 200000"),
                          ("--adapt-span", "off"), ("--checkpoint", "none")):
        block = text[text.index(f"  {flag} "):]
        block = block[:block.index("\n  --")]
        assert f"(default: {default})" in " ".join(block.split()), block
    assert "--local_rank" not in text  # accepted for old launchers, not listed


def test_generate_help_shows_its_own_flags_then_the_model_flags():
    parser = generate.build_parser()
    text = parser.format_help()
    shown = listed_flags(text)
    assert shown[:10] == ["--checkpoint", "--prompt", "--length", "--num-samples", "--temperature",
                          "--top-k", "--seed", "--no-kv-cache", "--device", "--threads"]
    assert {"--nlayers", "--hid-sz", "--adapt-span", "--pers-mem-size", "--adapt-io", "--block-sz"} <= set(shown)
    assert not {"--lr", "--optim", "--niter", "--full-eval-mode"} & set(shown)
    assert text.index("\ngeneration:\n") < text.index("\nmodel (") < text.index("\n  --nlayers")
    args = parser.parse_args(["--lr", "0.5"])  # main.py's other flags are still parsed (hidden)
    assert args.lr == 0.5 and set(vars(main.build_parser().parse_args([]))) <= set(vars(args))


def train(data, ckpt, *extra):
    return main.main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), *extra])


def test_resume_says_from_where(data, tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    assert train(data, ckpt, "--niter", "1") == 0
    assert "resumed" not in capsys.readouterr().out
    assert train(data, ckpt, "--niter", "2") == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 3 (iteration 1)\n" in out
    assert re.search(r"^steps: 6 ", out, re.M)
    assert train(data, ckpt, "--niter", "2") == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 6 (iteration 2)" in out
    assert "nothing to train: 2 iterations done, --niter 2" in out
    ckpt.write_bytes(b"truncated")  # the latest is unreadable: the previous one is used
    assert train(data, ckpt, "--niter", "2") == 0
    assert f"resumed from {ckpt}.prev at step 3 (iteration 1)" in capsys.readouterr().out


def test_slow_cpu_run_warns_once_with_the_time_per_step(data, tmp_path, capsys, monkeypatch):
    assert train(data, tmp_path / "a.pt", "--niter", "2") == 0
    assert "warning" not in capsys.readouterr().out  # a tiny model: the iteration takes seconds
    monkeypatch.setattr(train_log, "SLOW_ITERATION_S", 0.0)
    assert train(data, tmp_path / "b.pt", "--niter", "2") == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert re.fullmatch(r"warning: training on a CPU: the first step took \d+\.\d s, so this iteration "
                        r"\(3 steps\) ends in about \d+ s; the published configurations \(scripts/\*\.sh\) "
                        r"are meant for GPUs", warnings[0]), warnings[0]


def test_progress_lines_when_stdout_is_not_a_terminal(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_log, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    assert train(data, tmp_path / "a.pt", "--niter", "2") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("progress:")]
    assert [re.match(r"progress: iteration (\d) step (\d)/3 \(step (\d) overall\), \d+ ms/step, "
                     r"the iteration ends in about \d+ s$", line).groups() for line in lines] == [
        ("0", "1", "1"), ("0", "2", "2"), ("0", "3", "3"), ("1", "1", "4"), ("1", "2", "5"), ("1", "3", "6")]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal has the progress bar instead
    assert train(data, tmp_path / "b.pt", "--niter", "1") == 0
    assert "progress:" not in capsys.readouterr().out
    monkeypatch.setattr(train_log, "PROGRESS_EVERY_S", 60.0)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert train(data, tmp_path / "c.pt", "--niter", "1") == 0
    assert "progress:" not in capsys.readouterr().out  # less than a minute: none
