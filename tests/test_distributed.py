"""Multi-rank training of main.py on CPU (gloo), launched the way torchrun is used.

Two ranks with the global batch split between them must give the losses of one process
with the same global batch (dropout 0, so that no random stream differs), to 1e-5 after
several optimizer steps; a two-rank checkpoint written on SIGTERM resumes on one rank
(caches resharded) and completes the single-process run; evaluation over two ranks sums
NLL and token counts; a rank that dies ends the job with its traceback.
"""
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NB, NITER = 5, 6
MODEL = ["--nlayers", "2", "--hid-sz", "32", "--inner-hid-sz", "64", "--nheads", "2",
         "--attn-span", "64", "--block-sz", "16", "--batch-sz", "8", "--dropout", "0",
         "--adapt-span", "--adapt-span-loss", "0.01", "--optim", "adagrad", "--lr", "0.05",
         "--grad-clip", "0.5", "--lr-warmup", "20", "--nbatches", str(NB), "--niter", str(NITER)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TOL = 1e-5

sys.path.insert(0, str(ROOT))


def run(cmd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def lines(text: str) -> list:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(ckpt: Path) -> list:
    """The records of metrics.jsonl, next to the checkpoint (full float precision)."""
    folder = ckpt.with_name(ckpt.stem + ".logs")
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_close_histories(got: dict, want: dict, n: int) -> None:
    assert got["step"][:n] == want["step"][:n]
    for key in ("train_bpc", "val_bpc", "span_avg"):
        for a, b in zip(got[key][:n], want[key][:n]):
            assert abs(a - b) < TOL, (key, got[key], want[key])


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """One process, global batch 8: the checkpoint after NITER iterations."""
    ckpt = tmp_path_factory.mktemp("single") / "run.pt"
    out = run([sys.executable, "main.py", "--data", str(data), *MODEL, "--checkpoint", str(ckpt)])
    assert out.returncode == 0, out.stderr[-3000:]
    return ckpt


def collect(stream, into: list) -> None:
    for line in stream:
        into.append(line)


def drain(fd: int, into: list) -> None:
    """Read a pseudo-terminal until its other end is closed."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer has exited
            break
        if not chunk:
            break
        into.append(chunk.decode(errors="replace"))
    os.close(fd)


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """Two ranks (4 rows each) under torchrun; SIGTERM to torchrun once two iterations are
    logged: torchrun forwards it, the ranks finish their step and write one checkpoint.
    stderr is a terminal, so that progress bars are drawn (by rank 0 only)."""
    ckpt = tmp_path_factory.mktemp("two") / "run.pt"
    cmd = [*TORCHRUN, "main.py", "--data", str(data), *MODEL, "--checkpoint", str(ckpt), "--distributed"]
    terminal, child_end = os.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=child_end, text=True)
    os.close(child_end)
    out, err = [], []
    readers = [threading.Thread(target=collect, args=(proc.stdout, out)),
               threading.Thread(target=drain, args=(terminal, err))]
    for reader in readers:
        reader.start()
    deadline = time.time() + 150
    while sum(line.startswith("steps: ") for line in list(out)) < 2:
        assert proc.poll() is None and time.time() < deadline, "".join(out + err)[-3000:]
        time.sleep(0.005)
    proc.terminate()  # SIGTERM to torchrun
    proc.wait(timeout=120)
    for reader in readers:
        reader.join()
    return ckpt, "".join(out), "".join(err)


def test_local_rank_and_distributed_flags_are_accepted():
    import main
    parser = main.build_parser()
    for argv in (["--local-rank=3"], ["--local_rank", "3"], ["--local-rank", "3"], ["--local_rank=3"]):
        assert parser.parse_args(argv + ["--distributed"]).local_rank == 3
    assert parser.parse_args([]).distributed is False


def test_two_ranks_give_the_losses_of_one_process(single, two_ranks):
    ckpt, stdout, stderr = two_ranks
    want, got = metrics(single), metrics(ckpt)
    assert len(got) >= 2 and [r["step"] for r in got] == [NB * (i + 1) for i in range(len(got))]
    for a, b in zip(got, want):
        for key in ("train/loss", "val/loss", "lr", "span/span_avg"):
            assert abs(a[key] - b[key]) < TOL, (key, a, b)
    # only rank 0 logs: one header, one line per iteration, one progress bar, one signal line
    out = lines(stdout)
    assert sum(line.startswith("params: ") for line in out) == 1
    assert "ranks: 2 device: cpu" in out[0]
    assert [int(line.split()[1]) for line in out if line.startswith("steps: ")] == [r["step"] for r in got]
    assert stderr.count("iter 0:   0%") == 1 and stderr.count("iter 1:   0%") == 1
    assert sum("signal received" in line for line in out) == 1


def test_sigterm_under_torchrun_writes_a_two_rank_checkpoint(two_ranks):
    ckpt, stdout, _ = two_ranks
    saved = load(ckpt)
    step = saved["step"]
    assert f"signal received: checkpoint written at step {step}; exiting" in stdout
    assert 2 * NB < step < NITER * NB and saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert [c.shape[0] for c in saved["ranks"][1]["train_cache"]] == [4, 4]  # 4 rows per rank
    assert not torch.equal(saved["ranks"][0]["train_cache"][0], saved["ranks"][1]["train_cache"][0])
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["run.logs", "run.pt", "run.pt.prev"]


def test_two_rank_checkpoint_resumes_on_one_rank(data, single, two_ranks, tmp_path):
    """Caches resharded, stream positions and the partial iteration's loss kept: the run
    completes the single-process run's history."""
    ckpt = tmp_path / "run.pt"
    shutil.copyfile(two_ranks[0], ckpt)
    step = load(ckpt)["step"]
    out = run([sys.executable, "main.py", "--data", str(data), *MODEL, "--checkpoint", str(ckpt)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming 2-rank state on 1 ranks: caches resharded" in out.stdout
    logged = [int(line.split()[1]) for line in lines(out.stdout) if line.startswith("steps: ")]
    assert logged == [s for s in range(NB, NITER * NB + 1, NB) if s > step]  # no restart
    resumed, want = load(ckpt), load(single)
    assert resumed["step"] == NITER * NB and resumed["world_size"] == 1
    assert_close_histories(resumed["logger"], want["logger"], NITER)


def test_resume_with_another_global_batch_is_a_one_line_error(data, two_ranks, tmp_path):
    ckpt = tmp_path / "run.pt"
    shutil.copyfile(two_ranks[0], ckpt)
    before = ckpt.read_bytes()
    out = run([sys.executable, "main.py", "--data", str(data), *MODEL, "--checkpoint", str(ckpt),
               "--batch-sz", "4"])
    assert out.returncode == 2
    errors = lines(out.stderr)
    assert "Traceback" not in out.stderr and len(errors) == 1
    assert errors[0].startswith("error: --batch-sz 4 differs from the checkpoint's 8")
    assert ckpt.read_bytes() == before


def test_full_evaluation_on_two_ranks_sums_nll_and_counts(data, single, tmp_path):
    """--full-eval-mode over two ranks against a plain single-process evaluate(), on a
    shorter byte file (the same 256-byte vocabulary) to keep it fast."""
    from data import DataConfig, load_corpus
    from models import ModelConfig, TransformerSeq
    from evaluation import evaluate
    from utils import DistInfo
    short = tmp_path / "short.txt"
    short.write_bytes(data.read_bytes()[:60_000])
    out = run([*TORCHRUN, "main.py", "--data", str(short), "--checkpoint", str(single), "--full-eval-mode",
               "--eval-other-data"])
    assert out.returncode == 0, out.stderr[-3000:]
    saved = load(single)
    model = TransformerSeq(ModelConfig(**saved["config"]["model"]))
    model.load_state_dict(saved["model"])
    corpus = load_corpus(DataConfig(str(short)))
    got = [line for line in lines(out.stdout) if line.startswith(("val: ", "test: "))]
    assert len(got) == 2  # rank 0 only
    for line, split in zip(got, ("valid", "test")):
        nll, count = evaluate(model, model, corpus.split(split), 8, 16, DistInfo())
        m = re.search(r"tokens: (\d+) nll: (\S+)", line)
        assert int(m[1]) == count == len(corpus.split(split)) - 1
        assert abs(float(m[2]) - nll) < TOL


DIE = """import sys
sys.path.insert(0, {root!r})
import main, trainer
step = trainer.Trainer.train_step
def failing_step(self):
    if self.dist.rank == 1 and self.step == 3:
        raise RuntimeError("rank 1 fails on purpose")
    return step(self)
trainer.Trainer.train_step = failing_step
sys.exit(main.main())
"""


def test_a_dying_rank_ends_the_job_with_its_traceback(data, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE.format(root=str(ROOT)))
    out = run([*TORCHRUN, str(script), "--data", str(data), *MODEL, "--checkpoint", str(tmp_path / "run.pt")],
              timeout=150)
    assert out.returncode != 0
    root_cause = out.stderr[out.stderr.index("Root Cause"):]  # torchrun's error record
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause)
    assert "RuntimeError: rank 1 fails on purpose" in root_cause and "failing_step" in root_cause
