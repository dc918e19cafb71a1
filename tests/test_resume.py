"""Exact resume, signals, corrupt checkpoints, fine-tuning and non-finite steps of main.py.

Every test runs the real main.py as a subprocess on a tiny model and 200 KB of generated
English-like text (tests/conftest.py; byte level, split 90/5/5), and compares what the
checkpoints hold (the logged history at full precision and the weights) with one
uninterrupted run. On CPU with one thread a resumed run must reproduce it bitwise:
dropout is on, so the random states must be restored too.
"""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NB, NITER, WARMUP = 8, 5, 100
MODEL = ["--nlayers", "2", "--hid-sz", "32", "--inner-hid-sz", "64", "--nheads", "2",
         "--attn-span", "64", "--block-sz", "16", "--batch-sz", "8", "--dropout", "0.1",
         "--emb-dropout", "0.1", "--adapt-span", "--adapt-span-loss", "0.01", "--adapt-span-cache",
         "--lr-warmup", str(WARMUP), "--nbatches", str(NB), "--seed", "7"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS_LINE = re.compile(r"^steps: (\d+) train: (\S+?)bpc val: (\S+?)bpc ms/batch")


def command(data: Path, ckpt: Path, *extra) -> list:
    return [sys.executable, "main.py", "--data", str(data), *MODEL, "--niter", str(NITER),
            "--checkpoint", str(ckpt), *extra]


def run(cmd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def steps_lines(stdout: str) -> list:
    """(step, train bpc, val bpc) of every iteration line."""
    return [(int(m[1]), float(m[2]), float(m[3]))
            for m in map(STEPS_LINE.match, re.split(r"[\r\n]+", stdout)) if m]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run(ckpt: dict, ref: dict) -> None:
    """Bitwise the same history, step, weights and optimizer state."""
    assert ckpt["step"] == ref["step"] and ckpt["iter_no"] == ref["iter_no"]
    assert ckpt["logger"] == ref["logger"]
    assert ckpt["model"].keys() == ref["model"].keys()
    for name, value in ref["model"].items():
        assert torch.equal(ckpt["model"][name], value), name
    for key, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(ckpt["optimizer"]["state"][key][name], value), (key, name)


def copy_checkpoint(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    shutil.copyfile(src.with_name(src.name + ".prev"), dst.with_name(dst.name + ".prev"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run: its checkpoint (iteration NITER-1) and ``.prev`` (NITER-2)."""
    ckpt = tmp_path_factory.mktemp("reference") / "run.pt"
    out = run(command(data, ckpt))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = steps_lines(out.stdout)
    assert [s for s, _, _ in lines] == [NB * (i + 1) for i in range(NITER)]
    history = load(ckpt)["logger"]
    assert history["step"] == [s for s, _, _ in lines]
    assert [round(v, 3) for v in history["train_bpc"]] == [t for _, t, _ in lines]
    return ckpt


def test_checkpoint_contents_load_with_weights_only(reference):
    ckpt = load(reference)  # weights_only=True
    prev = load(reference.with_name("run.pt.prev"))
    assert (ckpt["iter_no"], ckpt["step"]) == (NITER - 1, NITER * NB)
    assert (prev["iter_no"], prev["step"]) == (NITER - 2, (NITER - 1) * NB)
    assert ckpt["config"]["train"]["batch_size"] == 8 and ckpt["config"]["model"]["dropout"] == 0.1
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.03 * min(1.0, NITER * NB / WARMUP)
    assert len(ckpt["logger"]["val_bpc"]) == NITER and len(prev["logger"]["val_bpc"]) == NITER - 1
    (rank,) = ckpt["ranks"]
    assert set(rank["rng"]) >= {"python", "numpy", "torch"}
    assert set(rank["train_stream"]) == {"pos", "rng"} and set(rank["valid_stream"]) == {"pos", "rng"}
    assert [c.shape[0] for c in rank["train_cache"]] == [8, 8]
    assert any(c.abs().sum() > 0 for c in rank["train_cache"])  # the caches carry state
    assert not list(reference.parent.glob("*.tmp"))


def test_sigkill_mid_iteration_resumes_bitwise(data, reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    cmd = command(data, ckpt)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    prev = tmp_path / "run.pt.prev"  # appears with the checkpoint of iteration 1
    deadline = time.time() + 120
    while not prev.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # into iteration 2
    proc.send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(steps_lines(stdout)) < NITER
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = steps_lines(out.stdout)
    assert 1 <= len(resumed) < NITER and resumed[0][0] > NB  # continued, not restarted
    assert_same_run(load(ckpt), load(reference))


class Reader:
    """Collects a process's stdout lines in a thread."""

    def __init__(self, proc):
        self.lines, self.proc = [], proc
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout=120) -> None:
        deadline = time.time() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert self.proc.poll() is None and time.time() < deadline, "".join(self.lines)
            time.sleep(0.005)

    def finish(self, timeout=120) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join()
        return "".join(self.lines)


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGUSR1)])
def test_signals_checkpoint_and_exit_then_resume_bitwise(data, reference, tmp_path, signals):
    """SIGTERM during iteration 1, then SIGUSR1 during the resumed run's next iteration:
    each finishes its step, writes a checkpoint, exits 0; the third run completes the
    uninterrupted run's sequence exactly."""
    ckpt = tmp_path / "run.pt"
    cmd = command(data, ckpt)
    seen_steps = []
    for sig in signals:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        reader = Reader(proc)
        reader.wait_for(r"^steps: ")  # an iteration is done: we are now in the next one
        proc.send_signal(sig)
        stdout = reader.finish()
        assert proc.returncode == 0, stdout
        saved = load(ckpt)
        assert f"signal received: checkpoint written at step {saved['step']}; exiting" in stdout
        assert len(steps_lines(stdout)) < NITER
        seen_steps.append(saved["step"])
    assert seen_steps[0] < seen_steps[1] < NITER * NB
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert steps_lines(out.stdout)[0][0] > NB
    assert_same_run(load(ckpt), load(reference))


def test_corrupt_latest_checkpoint_warns_and_uses_previous(data, reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    copy_checkpoint(reference, ckpt)
    good_prev = load(ckpt.with_name("run.pt.prev"))
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    out = run(command(data, ckpt))
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if "warning" in line]
    assert len(warnings) == 1 and re.match(r"warning: checkpoint \S+run\.pt cannot be read", warnings[0])
    assert [s for s, _, _ in steps_lines(out.stdout)] == [NITER * NB]  # the last iteration, redone
    assert_same_run(load(ckpt), load(reference))
    # the unreadable file was set aside, so the previous checkpoint is still the good one
    assert load(ckpt.with_name("run.pt.prev"))["logger"] == good_prev["logger"]
    assert ckpt.with_name("run.pt.corrupt").stat().st_size == reference.stat().st_size // 2


def test_fine_tuning_continues_at_the_new_rate(data, reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    copy_checkpoint(reference, ckpt)
    out = run(command(data, ckpt, "--lr", "0.003", "--niter", str(NITER + 1)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s for s, _, _ in steps_lines(out.stdout)] == [(NITER + 1) * NB]
    saved = load(ckpt)
    step = (NITER + 1) * NB
    assert saved["step"] == step and saved["config"]["train"]["lr"] == 0.003
    for group in saved["optimizer"]["param_groups"]:
        assert group["lr"] == 0.003 * min(1.0, step / WARMUP)
    assert saved["logger"]["step"] == [NB * (i + 1) for i in range(NITER + 1)]
    assert saved["logger"]["val_bpc"][:NITER] == load(reference)["logger"]["val_bpc"]


def test_nonfinite_gradients_are_skipped_and_counted(data, reference, tmp_path):
    """A span loss of 1e38 makes every gradient infinite: each update is skipped (the weights
    stay bitwise the same), counted in the log, and the run goes on."""
    ckpt = tmp_path / "run.pt"
    copy_checkpoint(reference, ckpt)
    out = run(command(data, ckpt, "--adapt-span-loss", "1e38", "--niter", str(NITER + 1),
                      "--max-nonfinite", "100"))
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("steps:")]
    assert line.endswith(f"nonfinite_skipped: {NB}") and " train: nanbpc " in line
    before, after = load(reference), load(ckpt)
    assert after["step"] == before["step"] + NB and after["nonfinite"] == [NB, NB]
    for name, value in before["model"].items():
        assert torch.equal(after["model"][name], value), name


def test_nonfinite_run_stops_and_leaves_last_good_checkpoint(data, reference, tmp_path):
    """--lr 1e30 makes the weights overflow: the losses turn NaN, and after --max-nonfinite
    such steps in a row the run stops with one error line, the checkpoints untouched."""
    ckpt = tmp_path / "run.pt"
    copy_checkpoint(reference, ckpt)
    prev = ckpt.with_name("run.pt.prev")
    before = digest(ckpt), digest(prev)
    out = run(command(data, ckpt, "--lr", "1e30", "--niter", str(NITER + 2), "--max-nonfinite", "3"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [line for line in re.split(r"[\r\n]+", out.stderr) if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: 3 steps in a row had a non-finite")
    assert (digest(ckpt), digest(prev)) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["run.pt", "run.pt.prev"]
