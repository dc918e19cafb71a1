"""How many CPU threads torch uses: chosen from the cores this process may run on and the
processes (local ranks) that share them, unless the user says.

Rule (measured by ``python scripts/bench_threads.py``, figures in docs/performance.md):
an explicit request (``--threads N``, N > 0) wins, then ``OMP_NUM_THREADS``; otherwise
the cores in the process's affinity mask divided among the local ranks, less the cores
that other processes keep busy (the one-minute load average, rounded), and at least one.
Threads on a core that another process also wants wait for each other at every parallel
region: on 2 cores with other work running, two threads made the quick start's step 8x to
10x slower than one, while on idle cores they made it 1.5x faster. A loss that large
against a gain that small is why a half-busy core already counts as busy.

Only ``os`` is imported here; torch is imported by ``apply_threads`` (so that a ``--help``
stays fast).
"""
import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def busy_cores(cores: int) -> int:
    """Cores kept busy by other processes: the one-minute load average, rounded to the
    nearest whole core, at most ``cores`` (0 where the system gives none)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0
    return min(cores, int(load + 0.5))


def local_world_size() -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks
    per node (``8`` or ``8(x2)``), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0].split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def choose_threads(requested: int, local_world_size: int) -> int:
    """The torch thread count of one process (rule in the module docstring)."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = available_cores()
    ranks = max(1, local_world_size)
    free = max(cores - busy_cores(cores), 1)
    return max(1, min(cores // ranks, free // ranks))


def per_process(processes: int) -> int:
    """Threads for each of ``processes`` processes that share this process's cores (the
    study's --jobs): OMP_NUM_THREADS where set, else the cores divided among them. A fixed
    rule of the cores, without the load term, so that a study's runs repeat exactly."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() // max(1, processes))


def source(requested: int) -> str:
    """Where the thread count comes from, in a word or two."""
    if requested > 0:
        return "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return "OMP_NUM_THREADS"
    return "cores"


def apply_threads(requested: int, local_world_size: int) -> str:
    """Set torch's intra-op threads to ``choose_threads`` and return the text of the
    parameters line, e.g. ``threads: 2 (cores: 2 free of 2, ranks here: 1)``."""
    import torch

    n = choose_threads(requested, local_world_size)
    torch.set_num_threads(n)
    how = source(requested)
    if how != "cores":
        return f"threads: {n} ({how})"
    cores = available_cores()
    return (f"threads: {n} (cores: {cores - busy_cores(cores)} free of {cores}, "
            f"ranks here: {max(1, local_world_size)})")
