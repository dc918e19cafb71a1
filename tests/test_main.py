"""End-to-end runs of main.py on generated text (tests/datagen.py), and its handling of bad input."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--nlayers 2 --hid-sz 32 --inner-hid-sz 64 --nheads 2 --attn-span 64 --block-sz 32 --batch-sz 8 "
        "--optim adagrad --lr 0.07 --momentum 0 --grad-clip 0.03 --dropout 0 --adapt-span "
        "--adapt-span-loss 2e-6 --adapt-span-cache --nbatches 20").split()
LOG = re.compile(r"^steps: (\d+) train: ([\d.]+)bpc val: ([\d.]+)bpc ms/batch: [\d.]+ "
                 r"span_avg: [\d.]+ span_max: \d+", re.M)


def run(*argv, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_resume_and_evaluate_on_enwik8(enwik8_file, tmp_path):
    ckpt = tmp_path / "run.pt"
    out = run("--data", enwik8_file, *TINY, "--niter", 2, "--checkpoint", ckpt).stdout
    lines = LOG.findall(out)
    assert [int(s) for s, _, _ in lines] == [20, 40]
    assert float(lines[1][1]) < float(lines[0][1])  # the loss falls
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iter_no"] == 1 and saved["step"] == 40
    assert (tmp_path / "run.logs" / "metrics.jsonl").is_file()

    out = run("--data", enwik8_file, *TINY, "--niter", 3, "--checkpoint", ckpt).stdout
    assert [int(s) for s, _, _ in LOG.findall(out)] == [60]  # resumed, not restarted
    assert torch.load(ckpt, weights_only=True)["logger"]["step"] == [20, 40, 60]

    out = run("--checkpoint", ckpt, "--full-eval-mode", "--batch-sz", 4).stdout
    found = re.findall(r"^(val|test): (\d+\.\d{4})bpc tokens: (\d+)", out, re.M)
    assert [name for name, _, _ in found] == ["val", "test"]
    assert all(1.0 < float(bpc) < 8.0 for _, bpc, _ in found)
    assert [int(n) for _, _, n in found] == [30_000 - 1, 30_000 - 1]  # all but each split's first token

    proc = run("--checkpoint", ckpt, "--full-eval-mode", "--hid-sz", 64, check=False)
    assert proc.returncode == 2
    assert "--hid-sz 64 contradicts the checkpoint" in proc.stderr and "--hid-sz 32" in proc.stderr
    assert "Traceback" not in proc.stderr


def error_of(argv, capsys):
    code = main.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_flags_and_data_are_one_clear_line(tmp_path, capsys):
    assert "no such file or folder" in error_of(["--data", tmp_path / "missing"], capsys)
    (tmp_path / "train.txt").write_text("1 2\n")
    assert "neither train.txt" in error_of(["--data", tmp_path], capsys)
    assert "--hid-sz 30 is not divisible by --nheads 4" in error_of(["--hid-sz", 30, "--nheads", 4], capsys)
    assert "--batch-split 3" in error_of(["--batch-sz", 8, "--batch-split", 3], capsys)
    assert "--full-eval-mode needs --checkpoint" in error_of(["--full-eval-mode"], capsys)


def test_mismatched_reference_checkpoint_is_an_error_and_is_not_overwritten(tmp_path, capsys, reference_data):
    fixture, data = reference_data("F1-text8-span")
    ckpt = tmp_path / "ref.pt"
    shutil.copy(fixture / "checkpoint.pt", ckpt)
    before = ckpt.read_bytes()
    flags = (fixture / "flags.txt").read_text().split()
    flags[flags.index("--hid-sz") + 1] = "32"
    message = error_of(flags + ["--data", data, "--checkpoint", ckpt], capsys)
    assert "does not match the model" in message and "pass the flags it was trained with" in message
    assert ckpt.read_bytes() == before


def test_corrupt_checkpoint_without_a_previous_one_is_an_error(tmp_path, capsys, enwik8_file):
    ckpt = tmp_path / "broken.pt"
    ckpt.write_bytes(b"not a checkpoint")
    message = error_of(["--data", enwik8_file, "--checkpoint", ckpt], capsys)
    assert "cannot be read" in message and str(ckpt) in message
    assert ckpt.read_bytes() == b"not a checkpoint"


def test_dry_run_prints_the_parameter_count(capsys):
    argv = ("--dry-run --vocab-size 205 --nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --nheads 8 "
            "--attn-span 8192 --adapt-span --adapt-span-cache").split()
    assert main.main(argv) == 0
    assert "(38.54M)" in capsys.readouterr().out


def test_word_level_adaptive_io_learns_and_reports_perplexity(wikitext_folder, tmp_path):
    ckpt = tmp_path / "wt.pt"
    flags = ("--adapt-io --adapt-io-tied --adapt-io-cutoffs 2000 6000 --data-unit ppl --nlayers 2 "
             "--hid-sz 64 --nheads 4 --attn-span 64 --block-sz 32 --batch-sz 8 --optim adam --lr 0.002 "
             "--lr-warmup 10 --grad-clip 1 --dropout 0 --pers-mem-size 16 --adapt-span --adapt-span-cache "
             "--nbatches 25 --niter 2").split()
    out = run("--data", wikitext_folder, *flags, "--checkpoint", ckpt).stdout
    val = [float(v) for v in re.findall(r"val: ([\d.]+)ppl", out)]
    assert len(val) == 2 and val[1] < val[0]
    saved = torch.load(ckpt, weights_only=True)
    words = saved["vocab"]["idx2word"]
    counts = {}
    for line in (wikitext_folder / "wiki.train.tokens").read_text(encoding="utf-8").splitlines():
        for w in line.split() + ["<eos>"]:
            counts[w] = counts.get(w, 0) + 1
    frequencies = [counts[w] for w in words]
    assert frequencies == sorted(frequencies, reverse=True)  # --adapt-io: most frequent first
    out = run("--checkpoint", ckpt, "--full-eval-mode", "--batch-sz", 4).stdout
    found = re.findall(r"^(val|test): (\d+\.\d{4})ppl tokens: (\d+)", out, re.M)
    assert [name for name, _, _ in found] == ["val", "test"]


def test_all_attention_model_learns_and_resumes(enwik8_folder, tmp_path):
    """On a reference-format folder (enwik8 bytes as decimal tokens)."""
    ckpt = tmp_path / "pers.pt"
    flags = [*TINY, "--pers-mem-size", 32, "--inner-hid-sz", 1, "--checkpoint", ckpt, "--data", enwik8_folder]
    lines = LOG.findall(run(*flags, "--niter", 2).stdout)
    assert len(lines) == 2 and float(lines[1][1]) < float(lines[0][1])
    state = torch.load(ckpt, weights_only=True)["model"]
    assert state["layers.0.attn.attn.persistent_memory.key"].shape == (2, 16, 32)  # (K, D, N)
    assert not any(".ff." in k or "norm2" in k for k in state)  # the FF sublayer is gone
    assert [int(s) for s, _, _ in LOG.findall(run(*flags, "--niter", 3).stdout)] == [60]
