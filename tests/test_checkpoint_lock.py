"""One training process per checkpoint (checkpoint_lock.py): two real main.py processes (the
second refuses at once, naming the first), a SIGKILLed holder's stale lock, evaluation
reading without the lock, two ranks sharing it, and the staleness rules one by one."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint_lock
from checkpoint_lock import CheckpointLock, hold_for_training, lock_path, owner_info
from datagen import english
from utils import ConfigError, DistInfo

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODEL = ["--nlayers", "1", "--hid-sz", "16", "--inner-hid-sz", "32", "--nheads", "2", "--attn-span", "16",
         "--block-sz", "8", "--batch-sz", "2", "--nbatches", "2", "--lr-warmup", "0"]


TIMED_MAIN = ("import sys, time; import main, torch, utils, checkpoint_lock, build, train_state; "  # start-up first
              "start = time.perf_counter(); code = main.main(sys.argv[1:]); "
              "print(f'refused after {time.perf_counter() - start:.3f} s', file=sys.stderr); sys.exit(code)")


def main_py(*argv, **kwargs):
    return subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kwargs)


def wait_for_lock(path: Path, pid: int, proc, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            info = json.loads(path.read_text())
            if info.get("pid") == pid:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never held pid {pid}")


def write_lock(path: Path, **changes) -> dict:
    info = {**owner_info(), **changes}
    path.write_text(json.dumps(info))
    return info


@pytest.fixture()
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(english(20_000, seed=3))
    return path


def test_second_training_refuses_at_once_and_the_killed_holders_lock_does_not_block(text, tmp_path):
    ckpt = tmp_path / "run.pt"
    first = main_py("--data", text, "--checkpoint", ckpt, *MODEL, "--niter", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert not lock_path(ckpt).exists()  # released at the end of the run
    holder = subprocess.Popen([sys.executable, "main.py", "--data", str(text), "--checkpoint", str(ckpt),
                               *MODEL, "--niter", "100000"], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_for_lock(lock_path(ckpt), holder.pid, holder)
        argv = ["--data", text, "--checkpoint", ckpt, *MODEL, "--niter", "3"]
        second = main_py(*argv)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert errors[0].startswith(f"error: --checkpoint {ckpt} is being trained by process {holder.pid} "
                                    f"on host {socket.gethostname()} since {info['since']}")
        # the time from main.main's start to the refusal, in a third process (the interpreter's
        # and torch's start-up, seconds on a loaded machine, come before main.py can act)
        timed = subprocess.run([sys.executable, "-c", TIMED_MAIN, *map(str, argv)], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)
        assert timed.returncode == 2 and errors[0] in timed.stderr, timed.stderr
        seconds = float(re.search(r"^refused after ([0-9.]+) s$", timed.stderr, flags=re.M).group(1))
        assert seconds < 2.0, seconds
        assert json.loads(lock_path(ckpt).read_text())["token"] == info["token"]  # untouched
        evaluation = main_py("--checkpoint", ckpt, "--full-eval-mode")  # reads without the lock
        assert evaluation.returncode == 0, evaluation.stderr[-2000:]
        assert re.search(r"^val: [0-9.]+bpc", evaluation.stdout, flags=re.M)
        assert json.loads(lock_path(ckpt).read_text())["token"] == info["token"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock_path(ckpt).read_text())["pid"] == holder.pid  # left behind by SIGKILL
    resumed = main_py("--data", text, "--checkpoint", ckpt, *MODEL, "--niter", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and not lock_path(ckpt).exists()


def test_ranks_share_the_lock_and_all_stop_on_refusal(text, tmp_path):
    """Two ranks (gloo) against a lock this test process holds: every rank exits, status 2,
    the launcher prints the one error line naming this process."""
    ckpt = tmp_path / "run.pt"
    lock = CheckpointLock(ckpt)
    assert lock.acquire() is None
    try:
        out = subprocess.run([sys.executable, "scripts/launch_ranks.py", "--standalone", "--nproc_per_node=2",
                              "main.py", "--data", str(text), "--checkpoint", str(ckpt), *MODEL, "--niter", "1"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert out.returncode == 2, out.stderr[-3000:]
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: --checkpoint {ckpt} is being trained by process {os.getpid()} "), out.stderr
    assert "Traceback" not in out.stderr and not ckpt.exists()


def test_live_holder_blocks_and_a_dead_or_reused_pid_does_not(tmp_path):
    path = lock_path(tmp_path / "run.pt")
    write_lock(path)  # this very process: alive
    holder = CheckpointLock(tmp_path / "run.pt").acquire()
    assert holder is not None and holder["pid"] == os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(path, pid=int(dead.stdout))  # a process that has exited
    lock = CheckpointLock(tmp_path / "run.pt")
    assert lock.acquire() is None and json.loads(path.read_text())["token"] == lock.info["token"]
    lock.release()
    assert not path.exists()
    write_lock(path, start=owner_info()["start"] + 1)  # our pid, another start time: a reused pid
    lock = CheckpointLock(tmp_path / "run.pt")
    assert lock.acquire() is None
    lock.release()


def test_another_hosts_lock_is_stale_after_its_heartbeat_stops(tmp_path):
    path = lock_path(tmp_path / "run.pt")
    write_lock(path, host="node-elsewhere", pid=1, boot_id="other")
    assert CheckpointLock(tmp_path / "run.pt").acquire()["host"] == "node-elsewhere"  # fresh: held
    old = time.time() - checkpoint_lock.STALE_S - 5
    os.utime(path, (old, old))
    lock = CheckpointLock(tmp_path / "run.pt")
    assert lock.acquire() is None
    lock.release()


def test_holder_refreshes_its_heartbeat_and_releases_only_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_lock, "HEARTBEAT_S", 0.05)
    lock = CheckpointLock(tmp_path / "sub" / "run.pt")
    assert lock.acquire() is None
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    end = time.monotonic() + 10
    while lock.path.stat().st_mtime < old + 500 and time.monotonic() < end:
        time.sleep(0.02)
    assert lock.path.stat().st_mtime > old + 500
    other = write_lock(lock.path, token="someone-else")
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == other["token"]  # not ours: left alone
    lock.path.unlink()
    lock = CheckpointLock(tmp_path / "new" / "deeper" / "run.pt")
    assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / "new").exists()  # folders made for the lock go when left empty


def test_evaluation_and_dry_runs_take_no_lock_and_refusal_is_a_config_error(tmp_path):
    ckpt = tmp_path / "run.pt"
    assert hold_for_training(str(ckpt), DistInfo(), training=False) is None
    assert hold_for_training(None, DistInfo()) is None and not lock_path(ckpt).exists()
    write_lock(lock_path(ckpt))
    with pytest.raises(ConfigError, match=f"is being trained by process {os.getpid()} on host"):
        hold_for_training(str(ckpt), DistInfo())
