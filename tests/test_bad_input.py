"""Bad input is refused before any work: one last line ``error: ...`` naming the flag or file,
exit status 2, every existing file byte-identical and nothing new written. Also: the data
travel with the checkpoint (split and fingerprint), Ctrl-C writes a checkpoint and exits 130,
and the launch scripts end with the real error line.

All data are generated here, so the tests run in a fresh clone.
"""
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from utils import DistInfo, StopFlag

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--nlayers 1 --hid-sz 16 --inner-hid-sz 32 --nheads 2 --attn-span 32 --block-sz 8 --batch-sz 4 "
        "--nbatches 4 --niter 1 --dropout 0 --adapt-span").split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def text(seed: int, nbytes: int = 24_000) -> bytes:
    """English-like words drawn with a fixed seed."""
    rng = random.Random(seed)
    words = ["the", "span", "of", "attention", "grows", "with", "each", "head", "and", "memory", "layer"]
    out = []
    while sum(map(len, out)) + len(out) < nbytes:
        out.append(rng.choice(words) + ("\n" if rng.random() < 0.1 else ""))
    return " ".join(out).encode()[:nbytes]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys, *names) -> str:
    """Run main.main in this process: status 2, the last stderr line an error naming ``names``."""
    code = main.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err, err
    assert err[-1].startswith("error: "), err
    for name in names:
        assert str(name) in err[-1], (name, err[-1])
    assert not [line for line in err if "Traceback" in line]
    return err[-1]


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(text(1))
    return tmp_path


# ---- 1. a checkpoint that does not exist -----------------------------------------------
def test_evaluation_of_a_missing_checkpoint_is_refused(workdir, capsys):
    before = snapshot(workdir)
    refused(["--data", workdir / "corpus.txt", "--checkpoint", workdir / "none.pt", "--full-eval-mode"],
            capsys, "--checkpoint", workdir / "none.pt", "no such file")
    assert snapshot(workdir) == before


def test_generation_from_a_missing_checkpoint_is_refused(workdir):
    before = snapshot(workdir)
    out = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint", str(workdir / "none.pt")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("error: --checkpoint") and "no such file" in last
    assert snapshot(workdir) == before


# ---- 2. impossible flags ------------------------------------------------------------------
@pytest.mark.parametrize("flags,name", [
    ("--nheads 0", "--nheads"), ("--batch-split 0", "--batch-split"), ("--hid-sz 0", "--hid-sz"),
    ("--inner-hid-sz 0", "--inner-hid-sz"), ("--nlayers 0", "--nlayers"), ("--block-sz 0", "--block-sz"),
    ("--attn-span 0", "--attn-span"), ("--nbatches 0", "--nbatches"), ("--niter 0", "--niter"),
    ("--batch-sz -4", "--batch-sz"), ("--dropout 1.5", "--dropout"), ("--dropout 1", "--dropout"),
    ("--emb-dropout -0.1", "--emb-dropout"), ("--pers-mem-size -3", "--pers-mem-size"),
    ("--lr -0.5", "--lr"), ("--lr 0", "--lr"), ("--lr nan", "--lr"),
    ("--adapt-span-ramp 1000 --attn-span 64", "--adapt-span-ramp 1000"),
    ("--adapt-span-init 2", "--adapt-span-init"), ("--max-nonfinite 0", "--max-nonfinite"),
    ("--data-split 0.1 0.1 0.1", "--data-split 0.1 0.1 0.1"), ("--data-split 0.5 0.3 0.3", "--data-split"),
    ("--data-split 1 0 0", "--data-split"),
])
def test_impossible_flag_is_refused_before_anything_is_written(workdir, capsys, flags, name):
    before = snapshot(workdir)
    argv = ["--data", workdir / "corpus.txt", *TINY, "--checkpoint", workdir / "ck" / "run.pt",
            "--cache-dir", workdir / "cache", *flags.split()]
    refused(argv, capsys, name)
    assert snapshot(workdir) == before and sorted(p.name for p in workdir.iterdir()) == ["corpus.txt"]


# ---- 3. the data travel with the checkpoint -------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One iteration on a generated file with a 0.8 / 0.1 / 0.1 split: (folder, checkpoint)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "corpus.txt").write_bytes(text(1))
    ckpt = folder / "run.pt"
    with StopFlag.restoring():
        assert main.main([str(a) for a in ["--data", folder / "corpus.txt", *TINY, "--data-split", 0.8, 0.1, 0.1,
                                            "--checkpoint", ckpt, "--tensorboard-dir", folder / "tb"]]) == 0
    return folder, ckpt


def test_checkpoint_holds_the_split_and_fingerprint(trained):
    folder, ckpt = trained
    data = torch.load(ckpt, weights_only=True)["config"]["data"]
    raw = (folder / "corpus.txt").read_bytes()
    assert data["split"] == [0.8, 0.1, 0.1]
    assert data["fingerprint"] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


@pytest.mark.parametrize("mode", ["resume", "evaluate"])
def test_other_data_of_the_same_size_is_refused_naming_both(trained, tmp_path, capsys, mode):
    folder, ckpt = trained
    other = tmp_path / "other.txt"
    other.write_bytes(text(2))  # the same size, other words
    before = snapshot(folder)
    argv = ["--data", other, "--checkpoint", ckpt] + (["--full-eval-mode"] if mode == "evaluate" else ["--niter", 2])
    message = refused(argv, capsys, f"--data {other}", f"{folder / 'corpus.txt'}", ckpt)
    assert "is not the data the checkpoint" in message
    assert snapshot(folder) == before
    if mode == "evaluate":  # on purpose: allowed, with a warning
        assert "--eval-other-data" in message
        assert main.main([str(a) for a in argv + ["--eval-other-data"]]) == 0
        assert "warning: evaluating on --data" in capsys.readouterr().out
        assert snapshot(folder) == before


def test_evaluation_without_the_split_flag_uses_the_stored_split(trained, capsys):
    folder, ckpt = trained
    assert main.main(["--checkpoint", str(ckpt), "--full-eval-mode"]) == 0
    counts = [int(n) for n in re.findall(r"^(?:val|test): \S+ tokens: (\d+)", capsys.readouterr().out, re.M)]
    n = len(text(1))
    assert counts == [int(n * 0.1) - 1, n - int(n * 0.8) - int(n * 0.1) - 1]


def test_another_split_than_the_stored_one_is_refused(trained, capsys):
    folder, ckpt = trained
    before = snapshot(folder)
    refused(["--checkpoint", ckpt, "--full-eval-mode", "--data-split", 0.9, 0.05, 0.05], capsys,
            "--data-split 0.9 0.05 0.05", "0.8 0.1 0.1")
    assert snapshot(folder) == before


def test_checkpoint_without_split_or_fingerprint_still_loads(trained, tmp_path, capsys):
    """A checkpoint written before these fields existed: evaluated and resumed as before
    (the split of the command line, no data check)."""
    folder, ckpt = trained
    old = torch.load(ckpt, weights_only=True)
    old["config"]["data"] = {"path": old["config"]["data"]["path"], "unit": "bpc"}
    path = tmp_path / "old.pt"
    torch.save(old, path)
    assert main.main(["--checkpoint", str(path), "--full-eval-mode"]) == 0
    counts = [int(n) for n in re.findall(r"tokens: (\d+)", capsys.readouterr().out)]
    n = len(text(1))
    assert counts == [int(n * 0.05) - 1, n - int(n * 0.9) - int(n * 0.05) - 1]  # the default 90/5/5
    with StopFlag.restoring():
        assert main.main(["--checkpoint", str(path), "--data-split", "0.8", "0.1", "0.1", "--niter", "2",
                          "--tensorboard-dir", str(tmp_path / "tb")]) == 0
    assert torch.load(path, weights_only=True)["config"]["data"]["fingerprint"]["size"] == n


# ---- 4. outputs that cannot be written ---------------------------------------------------
@pytest.mark.parametrize("case", ["checkpoint under a file", "checkpoint is a folder", "read-only folder",
                                  "tensorboard under a file"])
def test_unwritable_output_is_found_before_training(workdir, capsys, case):
    (workdir / "notes.txt").write_text("a file")
    (workdir / "locked").mkdir()
    flag, path = {"checkpoint under a file": ("--checkpoint", workdir / "notes.txt" / "run.pt"),
                  "checkpoint is a folder": ("--checkpoint", workdir / "locked"),
                  "read-only folder": ("--checkpoint", workdir / "locked" / "sub" / "run.pt"),
                  "tensorboard under a file": ("--tensorboard-dir", workdir / "notes.txt" / "tb")}[case]
    argv = ["--data", workdir / "corpus.txt", *TINY, "--cache-dir", workdir / "cache", flag, path]
    if flag == "--tensorboard-dir":
        argv += ["--checkpoint", workdir / "run.pt"]
    before = snapshot(workdir)
    (workdir / "locked").chmod(0o555)
    try:
        refused(argv, capsys, flag, path)
    finally:
        (workdir / "locked").chmod(0o755)
    assert snapshot(workdir) == before
    assert sorted(p.name for p in workdir.iterdir()) == ["corpus.txt", "locked", "notes.txt"]


# ---- 5. Ctrl-C --------------------------------------------------------------------------
def test_ctrl_c_is_a_stop_request_and_a_second_press_aborts():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job (nohup, &)
    with StopFlag.restoring():
        stop = StopFlag()
        assert stop.agreed(DistInfo()) is None
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.agreed(DistInfo()) == 130
        os.kill(os.getpid(), signal.SIGINT)  # at once: a forwarded copy, not a second press
        time.sleep(0.01)
        stop.interrupted_at -= 2 * StopFlag.REPEAT_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        term = StopFlag()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert term.agreed(DistInfo()) == 0
    assert signal.getsignal(signal.SIGINT) is before


def read_until(proc, pattern: str, timeout: float = 120) -> list:
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.time() < deadline, "".join(lines)
    raise AssertionError("".join(lines))


def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_exactly(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(text(3, 40_000))
    flags = [*TINY, "--dropout", "0.1", "--nbatches", "6", "--niter", "3"]

    def command(name):
        return [sys.executable, "main.py", "--data", str(tmp_path / "corpus.txt"), *flags,
                "--checkpoint", str(tmp_path / name)]
    full = subprocess.run(command("full.pt"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(command("run.pt"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = read_until(proc, r"^steps: 6 ")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines += out.splitlines(keepends=True)
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert proc.returncode == 130, err[-2000:]
    assert lines[-1].strip() == (f"signal received: checkpoint written at step {saved['step']}; exiting. "
                                 f"The checkpoint is {tmp_path / 'run.pt'}: rerun the same command to resume")
    assert "Traceback" not in err and saved["step"] < 18
    again = subprocess.run(command("run.pt"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed, want = torch.load(tmp_path / "run.pt", weights_only=True), torch.load(tmp_path / "full.pt",
                                                                                    weights_only=True)
    assert resumed["logger"] == want["logger"] and resumed["step"] == want["step"] == 18
    for name, value in want["model"].items():
        assert torch.equal(resumed["model"][name], value), name


# ---- 6. launch scripts -------------------------------------------------------------------
def launch(script: str, *args, env=None, **kwargs):
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=180, **kwargs)


@pytest.mark.parametrize("gpus", [["--gpus", "0"], ["--gpus", "abc"], ["--gpus=-2"], ["--gpus"]])
def test_launch_script_checks_gpus(gpus):
    out = launch("text8.sh", *gpus, "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --gpus")
    assert "+ " not in out.stdout  # nothing was run


@pytest.fixture()
def prepared(tmp_path):
    """A reference-format text8 folder (generated, marked prepared) and the launch environment."""
    folder = tmp_path / "text8"
    folder.mkdir()
    for name, seed in (("train", 4), ("valid", 5), ("test", 6)):
        chars = text(seed, 6000 if name == "train" else 1500).decode().replace("\n", " ")
        (folder / f"{name}.txt").write_text(" ".join("_" if c == " " else c for c in chars))
    (folder / ".prepared.json").write_text('{"test_size": null}')
    return {"DATA_DIR": str(folder), "CHECKPOINT": str(tmp_path / "ck" / "run.pt")}


def test_launch_script_ends_with_the_workers_error_line(prepared):
    out = launch("text8.sh", "--gpus", "1", "--nheads", "0", env=prepared)
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert err[-1] == "error: --nheads must be at least 1, got 0"
    assert sum(line.startswith("error:") for line in err) == 1 and "Traceback" not in out.stderr


def test_ctrl_c_through_the_launch_script_saves_without_a_traceback(prepared):
    small = ("--nlayers 1 --hid-sz 16 --inner-hid-sz 32 --nheads 2 --attn-span 32 --block-sz 8 --batch-sz 4 "
             "--nbatches 4 --niter 100 --lr-warmup 0 --dropout 0").split()
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "text8.sh"), "--gpus", "2", *small], cwd=ROOT,
                            env={**ENV, **prepared}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = read_until(proc, r"^steps: 4 ")
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole process group
    out, _ = proc.communicate(timeout=120)
    lines += out.splitlines(keepends=True)
    assert proc.returncode == 130, "".join(lines)[-3000:]
    tail = [line.strip() for line in lines if line.strip()][-1]
    assert re.fullmatch(r"signal received: checkpoint written at step \d+; exiting\. The checkpoint is "
                        r"\S+run\.pt: rerun the same command to resume", tail), "".join(lines)[-3000:]
    assert "Traceback" not in "".join(lines)
    assert torch.load(prepared["CHECKPOINT"], weights_only=True)["world_size"] == 2
