"""threads.py: the thread count from the affinity mask, the local ranks, the load,
OMP_NUM_THREADS and an explicit request (all monkeypatched, nothing timed)."""
import os

import pytest
import torch

import threads


@pytest.fixture
def machine(monkeypatch):
    """Set the cores in the affinity mask and the one-minute load; no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_machine(cores: int, load: float = 0.0):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    return set_machine


@pytest.mark.parametrize("cores, ranks, load, expected", [
    (2, 1, 0.0, 2),    # idle 2-core machine, one process: both cores
    (2, 2, 0.0, 1),    # two local ranks share them
    (2, 1, 0.4, 2),    # a little load: still idle
    (2, 1, 0.6, 1),    # half a core busy counts as busy
    (2, 1, 7.0, 1),    # busier than the machine: at least one thread
    (64, 8, 0.0, 8),   # a GPU node: the cores divided among the ranks
    (64, 8, 16.0, 6),  # 48 free cores among 8 ranks
    (3, 2, 0.0, 1),    # rounded down
    (1, 4, 0.0, 1),    # more ranks than cores
])
def test_choice_from_affinity_ranks_and_load(machine, cores, ranks, load, expected):
    machine(cores, load)
    assert threads.choose_threads(0, ranks) == expected
    assert threads.source(0) == "cores"


def test_affinity_not_cpu_count(machine, monkeypatch):
    """A process pinned to 4 of 64 cores (taskset, a SLURM allocation) uses 4."""
    machine(4)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads.choose_threads(0, 1) == 4


def test_no_affinity_call_falls_back_to_cpu_count(machine, monkeypatch):
    machine(1)

    def unsupported(pid):
        raise OSError("not here")
    monkeypatch.setattr(os, "sched_getaffinity", unsupported)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert threads.choose_threads(0, 3) == 2


def test_omp_num_threads_wins_over_the_cores(machine, monkeypatch):
    machine(16)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(0, 1) == 3 and threads.source(0) == "OMP_NUM_THREADS"
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty or nonsense: ignored
    assert threads.choose_threads(0, 1) == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert threads.choose_threads(0, 1) == 16


def test_explicit_request_wins_over_everything(machine, monkeypatch):
    machine(2, load=5.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(5, 8) == 5 and threads.source(5) == "--threads"


def test_apply_sets_torch_and_says_why(machine, monkeypatch):
    before = torch.get_num_threads()
    try:
        machine(2, load=0.0)
        text = threads.apply_threads(0, 1)
        assert torch.get_num_threads() == 2
        assert text == "threads: 2 (cores: 2 free of 2, ranks here: 1)"
        machine(2, load=1.2)
        assert threads.apply_threads(0, 1) == "threads: 1 (cores: 1 free of 2, ranks here: 1)"
        assert threads.apply_threads(3, 1) == "threads: 3 (--threads)"
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_import_is_light():
    """threads.py imports no torch itself (main.py --help imports it before argparse)."""
    import subprocess
    import sys
    code = "import sys, threads; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(threads.__file__))
    assert out.stdout.strip() == "False", out.stderr


def test_local_world_size_from_torchrun_or_slurm(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert threads.local_world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert threads.local_world_size() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's wins
    assert threads.local_world_size() == 4


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(machine, monkeypatch):
    """CPU sums round by thread count, so a resume takes the stored count unless told."""
    from build import use_threads
    before = torch.get_num_threads()
    try:
        machine(8, 0.0)
        assert use_threads(0, {"threads": 3}).startswith("threads: 3 (as the run")
        assert torch.get_num_threads() == 3
        assert use_threads(2, {"threads": 3}) == "threads: 2 (--threads)"  # an explicit request wins
        assert torch.get_num_threads() == 2
        assert use_threads(0, {}).startswith("threads: 8 (cores")  # a fresh run (or an old checkpoint)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert use_threads(0, {"threads": 3}) == "threads: 1 (OMP_NUM_THREADS)"
    finally:
        torch.set_num_threads(before)


def test_the_study_divides_the_cores_among_its_jobs_without_the_load(machine, monkeypatch):
    machine(2, 7.0)  # a busy machine: the study's rule ignores the load (its runs repeat)
    assert threads.per_process(2) == 1 and threads.per_process(1) == 2 and threads.per_process(4) == 1
    machine(16, 0.0)
    assert threads.per_process(4) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.per_process(4) == 3
