"""The training loop: iterations of --nbatches steps, each followed by a partial validation,
its log line and a checkpoint; a stop signal agreed by every rank writes a checkpoint and
exits; too many non-finite steps in a row stop the run with one error line."""
import math
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

import checkpoint as ckpt_io
from checks import tensorboard_dir
from train_log import Progress, log_iteration
from train_state import TrainState
from utils import ConfigError, DistInfo, MetricsLog, StopFlag


def save(state: TrainState, dist: DistInfo) -> Optional[float]:
    """Write the checkpoint (rank 0); its caches' size in MB, or None where nothing is written."""
    ckpt = state.state_dict()  # a collective: every rank takes part
    path = state.settings.run.checkpoint
    if not (dist.is_main and path):
        return None
    ckpt_io.write_checkpoint(ckpt, Path(path))
    return ckpt_io.cache_megabytes(ckpt)


def stop_message(path: str, step: int) -> str:
    if not path:
        return f"signal received at step {step}; exiting without a checkpoint (no --checkpoint was given)"
    return (f"signal received: checkpoint written at step {step}; exiting. The checkpoint is "
            f"{path}: rerun the same command to resume")


def run_steps(state: TrainState, stop: StopFlag, progress: Progress, dist: DistInfo) -> dict:
    """The steps left in the current iteration: their mean grad norm and time per step, or
    the exit status where a stop signal was agreed on (the checkpoint then written)."""
    trainer, nb = state.trainer, state.settings.train.nbatches
    start, steps_run, norms = time.time(), 0, []
    bar = tqdm(total=nb, initial=trainer.iter_step, desc=f"iter {state.done}", leave=False,
               disable=None if dist.is_main else True, mininterval=1)
    while trainer.iter_step < nb:
        result = trainer.train_step()
        steps_run += 1
        if math.isfinite(result["grad_norm"]):
            norms.append(result["grad_norm"])
        bar.update(1)
        progress.step(trainer, state.done, start, steps_run)
        if trainer.nonfinite_in_row >= state.settings.train.max_nonfinite:
            bar.close()
            raise ConfigError(f"{trainer.nonfinite_in_row} steps in a row had a non-finite loss or "
                              f"gradient (last grad norm {result['grad_norm']}); stopping. The last good "
                              "checkpoint is untouched: lower --lr or raise --grad-clip and resume")
        code = stop.agreed(dist)
        if code is not None:
            bar.close()
            save(state, dist)
            return {"stop": code}
    bar.close()
    return {"ms": (time.time() - start) * 1000 / max(steps_run, 1),
            "grad_norm": sum(norms) / len(norms) if norms else math.nan}


def train(state: TrainState, dist: DistInfo, log) -> int:
    """Train up to --niter iterations; the exit status."""
    cfg, path = state.settings.train, state.settings.run.checkpoint
    metrics = MetricsLog(tensorboard_dir(state.settings), dist.is_main)
    stop = StopFlag()
    progress = Progress(cfg.nbatches, dist, log)
    if state.done >= cfg.niter:
        log(f"nothing to train: {state.done} iterations done, --niter {cfg.niter}")
    while state.done < cfg.niter:
        run = run_steps(state, stop, progress, dist)
        if "stop" in run:
            log(stop_message(path, state.step))
            return run["stop"]
        train_nll = state.trainer.end_iteration()
        val_nll = state.trainer.validate(max(1, cfg.nbatches // 10))
        log_iteration(state, train_nll, val_nll, run["ms"], metrics, log, grad_norm=run["grad_norm"])
        state.done += 1
        mb = save(state, dist)
        if state.done == 1 and mb is not None:
            log(f"checkpoint {path}: caches {mb:.1f} MB")
    metrics.close()
    return 0
