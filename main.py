"""Train or evaluate a Transformer with adaptive attention span and persistent memory:
the wiring of the library modules (``python main.py --help`` for the flags).

    command line   flags.py (built from config.py's dataclasses), settings.py
    checks         checks.py; checkpoint files: checkpoint.py
    building       build.py (threads, data, model), train_state.py (save and resume)
    running        train_loop.py with train_log.py; evaluation.py (--full-eval-mode)

Nothing heavy is imported before the command line is parsed: --help answers at once.
"""
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from errors import ConfigError
from flags import build_parser, explicit_flags
from settings import Settings


def parse(argv: Optional[List[str]]) -> Tuple[Settings, set]:
    """The settings of the command line and the flags it gave (--help exits here)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    return Settings.from_args(args), explicit_flags(argv)


def read_checkpoint(s: Settings, explicit: set, log) -> Optional[dict]:
    """The checkpoint to resume or evaluate (None: a fresh run), its configuration merged
    into the settings."""
    import checkpoint as ckpt_io
    path = s.run.checkpoint
    if not path or s.run.dry_run:
        return None
    ckpt = (ckpt_io.require_checkpoint(path, log) if s.run.full_eval_mode
            else ckpt_io.load_checkpoint(Path(path), log))
    if ckpt is not None and not ckpt_io.is_reference(ckpt):
        s.merge_saved(ckpt["config"], explicit, path)
    return ckpt


def run(s: Settings, explicit: set) -> int:
    # imported once the command line is parsed
    import checkpoint as ckpt_io
    import checkpoint_lock
    from build import build_model, dry_run, load_data, use_threads
    from checks import check_batch, check_flags, check_outputs, check_same_data, check_vocab
    from compile_model import compile_layers
    from data import data_fingerprint
    from evaluation import full_eval
    from train_log import log_to
    from train_state import load_model_state
    from utils import init_distributed, shutdown, wrap_ddp

    s.check_ranges()  # each flag on its own, before any file is read
    dist = init_distributed(s.run.device)
    log = log_to(dist)
    checkpoint_lock.hold_for_training(s.run.checkpoint, dist,
                                      training=not (s.run.full_eval_mode or s.run.dry_run))
    ckpt = read_checkpoint(s, explicit, log)
    threads = use_threads(s.run.threads, ckpt)
    check_flags(s)
    if s.run.dry_run:
        return dry_run(s, log)
    check_batch(s, dist)
    fingerprint = data_fingerprint(s.data)
    if ckpt is not None and not ckpt_io.is_reference(ckpt):
        check_same_data(s, ckpt["config"]["data"], fingerprint, log)
    if not s.run.full_eval_mode:
        check_outputs(s)
    corpus = load_data(s.data, dist)
    check_vocab(s, ckpt, corpus.vocab.idx2word)
    model, _ = build_model(s, len(corpus.vocab), dist.device)
    if s.run.full_eval_mode:
        load_model_state(model, ckpt, s.run.checkpoint)
    if s.run.compile:
        compile_layers(model, log=log)
    ddp_model = wrap_ddp(model, dist)
    n = model.num_parameters()
    log(f"params: {n:,} ({n / 1e6:.2f}M) vocab: {len(corpus.vocab)} ranks: {dist.world_size} "
        f"device: {dist.device} {threads}")
    if s.run.full_eval_mode:
        code = full_eval(s, ddp_model, model, corpus, dist, log)
    else:
        code = train(s, model, ddp_model, corpus, ckpt, dist, log)
    shutdown(dist)  # a process group left to the interpreter's exit can abort a rank
    return code


def train(s: Settings, model, ddp_model, corpus, ckpt: Optional[dict], dist, log) -> int:
    """A fresh or resumed training run; the exit status."""
    import checkpoint as ckpt_io
    from train_loop import train as train_iterations
    from train_state import TrainState
    from utils import StopFlag, seed_everything

    seed_everything(s.train.seed, dist.rank)
    state = TrainState(s, model, ddp_model, corpus, dist)
    if ckpt is not None:
        state.load_state_dict(ckpt, s.run.checkpoint, log)
        if dist.is_main:
            ckpt_io.set_aside_unreadable(ckpt, Path(s.run.checkpoint), log)
        log(state.resumed_line(s.run.checkpoint))
    with StopFlag.restoring():
        return train_iterations(state, dist, log)


def main(argv=None) -> int:
    settings, explicit = parse(argv)
    # torchrun's error record of a crash (the traceback of the failing rank)
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(guarded_run)(settings, explicit)


def guarded_run(settings: Settings, explicit: set) -> int:
    """``run``, with a user error as one ``error:`` line (status 2) and Ctrl-C as status 130."""
    try:
        return run(settings, explicit)
    except ConfigError as err:
        if not report_error(f"error: {err}"):
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: exited without writing a checkpoint (the last one written, if any, is "
                  "intact: rerunning the same command resumes from it)", file=sys.stderr, flush=True)
        return 130
    finally:
        lock = sys.modules.get("checkpoint_lock")  # imported by run() once the flags were read
        if lock is not None:
            lock.release_all()


def report_error(line: str) -> bool:
    """Under scripts/launch_ranks.py ($ADAPTIVE_SPAN_ERROR_FILE set), append the error line to
    that file for the launcher to print last, once for all ranks; False when not handed over."""
    path = os.environ.get("ADAPTIVE_SPAN_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')}\t{line}\n")
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
