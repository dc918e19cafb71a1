"""Timing and peak-memory helpers of the benchmark scripts (no model code).

Timings: medians, the steps alternating within every repeat (so all see the same
machine load). Peak memory: on CPU the growth of the kernel's peak resident set size
(VmHWM, reset through /proc/self/clear_refs) over the resident size before the step,
on CUDA torch.cuda.max_memory_allocated over the allocated memory before the step.
"""
import ctypes
import resource
import statistics
import time

import torch


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(trim: bool = True) -> int:
    """Reset the kernel's peak resident set size (VmHWM) to the current one; return it in bytes.
    ``trim``: hand freed heap memory back first (malloc_trim), so that the baseline holds live
    memory only; without it the allocator is left as a user's run has it."""
    try:
        if trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


def process_peak_rss_bytes() -> int:
    """The whole process's peak resident set size since it started (imports included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, device: str, repeats: int) -> dict:
    """Median seconds per step of each (warmed-up) path, the paths alternating
    within every repeat (so both see the same machine load)."""
    return time_interleaved_cpu(steps, device, repeats)[0]


def time_interleaved_cpu(steps: dict, device: str, repeats: int):
    """As ``time_interleaved``: the median wall seconds per step of each path, and the
    median CPU seconds of this thread (which other jobs on the machine do not inflate)."""
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            steps[name]()
            _sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def peak_memory_mb(step, device: str) -> float:
    """Peak memory of one step after a warm-up step (see the module docstring)."""
    step()  # one-time allocations (thread pools, optimizer state) are not counted
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    return (peak - base) / 2**20


def matmul_seconds(n: int = 512):
    """A step that multiplies two n x n fp32 matrices, and its FLOPs."""
    a, b = torch.randn(n, n), torch.randn(n, n)  # (n, n)
    return (lambda: torch.mm(a, b)), 2.0 * n ** 3


def training_step(model, optimizer, x: torch.Tensor, caches: list, device: str = "cpu",
                  bf16: bool = False, after=None):
    """A closure that runs one training step of ``model`` on the fixed tokens x (B, M + 1):
    forward over the carried caches, span loss, backward, ``optimizer`` step, then ``after()``
    (default: ``model.clamp_spans``); the benchmarks and the smoke test time it."""
    state = {"caches": caches}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            nll, nxt = model(x[:, :-1], state["caches"], x[:, 1:])  # (B, M)
            loss = nll.mean() + model.span_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        (after or model.clamp_spans)()
        state["caches"] = [c.detach() for c in nxt]
    return step
