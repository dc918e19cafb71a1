"""Train or evaluate a Transformer with adaptive attention span and persistent memory.

    python main.py --data data/enwik8 --checkpoint checkpoints/run.pt --adapt-span ...
    torchrun --nproc_per_node=8 main.py ...            # one process per GPU
    python main.py --checkpoint checkpoints/run.pt --full-eval-mode

Every flag of the reference implementation keeps its spelling, default and meaning.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import checkpoint as ckpt_io
import checkpoint_lock
from compile_model import compile_layers
import flops
import plots  # matplotlib is imported lazily, only for the spans image
from checks import check_flag_ranges, check_flags, check_outputs, check_same_data
from data import DataConfig, data_fingerprint, load_corpus
from flags import HelpFormatter, add_flag_groups
from models import ModelConfig, TransformerSeq
from trainer import TrainConfig, Trainer, build_optimizer, evaluate, to_unit
from utils import (ConfigError, MetricsLog, StopFlag, barrier, init_distributed, previous_path,
                   seed_everything, shutdown, wrap_ddp)

# flag dest -> ModelConfig field
MODEL_FLAGS = {"hid_sz": "hidden_size", "inner_hid_sz": "inner_hidden_size", "nlayers": "nlayers",
               "nheads": "nheads", "attn_span": "attn_span", "dropout": "dropout",
               "emb_dropout": "emb_dropout", "adapt_span": "adapt_span",
               "adapt_span_loss": "adapt_span_loss", "adapt_span_ramp": "adapt_span_ramp",
               "adapt_span_init": "adapt_span_init", "adapt_span_cache": "adapt_span_cache",
               "adapt_span_dynamic": "adapt_span_dynamic",
               "pers_mem_size": "pers_mem_size", "pers_mem_keep_ff": "pers_mem_keep_ff",
               "attn_impl": "attn_impl", "adapt_io": "adapt_io", "adapt_io_tied": "adapt_io_tied",
               "adapt_io_divval": "adapt_io_divval", "adapt_io_cutoffs": "adapt_io_cutoffs"}
# flag dest -> TrainConfig field
TRAIN_FLAGS = {"optim": "optim", "lr": "lr", "momentum": "momentum", "grad_clip": "grad_clip",
               "lr_warmup": "lr_warmup", "batch_sz": "batch_size", "batch_split": "batch_split",
               "block_sz": "block_size", "nbatches": "nbatches", "niter": "niter", "seed": "seed",
               "max_nonfinite": "max_nonfinite", "amp": "amp"}
# model flags a resumed run may change; every other model flag must match the checkpoint
MUTABLE_MODEL = {"dropout", "emb_dropout", "adapt_span_loss", "attn_impl"}


EPILOG = """examples:
  python main.py --data notes.txt --checkpoint runs/notes.pt --nlayers 3 --hid-sz 128 --niter 5
  python main.py --checkpoint runs/notes.pt --full-eval-mode    # a checkpoint carries its flags
  bash scripts/enwik8.sh --dry-run                               # a published configuration
Documentation: README.md and docs/."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                                usage="python main.py [flags]")
    add_flag_groups(p)  # flags.py: every flag, by group
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set:
    """Dests of the flags given on the command line."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                probe.add_argument(*action.option_strings, action="store_const", const=True, **kwargs)
            else:
                probe.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def configs_from_args(args, vocab_size: int):
    model = ModelConfig(vocab_size=vocab_size, **{f: getattr(args, d) for d, f in MODEL_FLAGS.items()})
    train = TrainConfig(**{f: getattr(args, d) for d, f in TRAIN_FLAGS.items()})
    return model, train


def merge_saved_config(args, explicit: set, saved: dict) -> None:
    """Take the configuration of one of our checkpoints; contradicting model flags are errors."""
    for dest, field in MODEL_FLAGS.items():
        value = saved["model"][field]
        if dest in explicit and getattr(args, dest) != value and dest not in MUTABLE_MODEL:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} {getattr(args, dest)} contradicts the checkpoint {args.checkpoint}, "
                              f"which was trained with {flag} {value}; drop the flag or use another checkpoint")
        if dest not in explicit:
            setattr(args, dest, value)
    for dest, field in TRAIN_FLAGS.items():
        if dest not in explicit:
            setattr(args, dest, saved["train"][field])
    if "data" not in explicit:
        args.data = saved["data"]["path"]
    if "data_unit" not in explicit:
        args.data_unit = saved["data"].get("unit", args.data_unit)
    split = saved["data"].get("split")  # of a plain text file; absent in older checkpoints
    if split and "data_split" in explicit and list(args.data_split) != list(split) and Path(args.data).is_file():
        given, stored = (" ".join(f"{x:g}" for x in v) for v in (args.data_split, split))
        raise ConfigError(f"--data-split {given} contradicts the checkpoint {args.checkpoint}, whose run "
                          f"split its data {stored}; drop the flag (the stored split is used)")
    if split and "data_split" not in explicit:
        args.data_split = list(split)


def log_to(dist):
    return (lambda msg: print(msg, flush=True)) if dist.is_main else (lambda msg: None)


def build_model(args, vocab_size: int, device):
    model_cfg, train_cfg = configs_from_args(args, vocab_size)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    try:
        model = TransformerSeq(model_cfg)
    except (NotImplementedError, ValueError) as err:
        raise ConfigError(f"the model flags are inconsistent: {err}") from None
    return model.to(device), model_cfg, train_cfg


def dry_run(args, log) -> int:
    vocab = args.vocab_size or (len(load_corpus(DataConfig(args.data, args.adapt_io, cache_dir=args.cache_dir)).vocab)
                                if Path(args.data).exists() else 0)
    if not vocab:
        raise ConfigError(f"--dry-run needs --vocab-size N when --data {args.data} does not exist")
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model, model_cfg, _ = build_model(args, vocab, "meta")
    n = model.num_parameters()
    log(f"model: {model_cfg}")
    log(f"params: {n:,} ({n / 1e6:.2f}M)")
    return 0


def full_eval(args, ddp_model, model, corpus, dist, log) -> int:
    unit = args.data_unit
    for split in ("valid", "test"):
        nll, count = evaluate(ddp_model, model, corpus.split(split), args.batch_sz, args.block_sz, dist,
                              reference=args.reference_eval, amp=args.amp, desc=split)
        name = "val" if split == "valid" else "test"
        log(f"{name}: {to_unit(nll, unit):.4f}{unit} tokens: {count} nll: {nll:.6f}")
    return 0


def tensorboard_dir(args) -> Path:
    if args.tensorboard_dir:
        return Path(args.tensorboard_dir)
    if args.checkpoint:
        path = Path(args.checkpoint)
        return path.with_name(path.stem + ".logs")
    return None


def stop_message(args, step: int) -> str:
    if not args.checkpoint:
        return f"signal received at step {step}; exiting without a checkpoint (no --checkpoint was given)"
    return (f"signal received: checkpoint written at step {step}; exiting. The checkpoint is "
            f"{args.checkpoint}: rerun the same command to resume")


def checkpoint_meta(args, trainer, corpus, model_cfg) -> dict:
    """What main.py adds to the trainer's state: configuration, data identity, vocabulary."""
    data = {"path": args.data, "unit": args.data_unit, "fingerprint": corpus.fingerprint,
            "split": list(args.data_split) if Path(args.data).is_file() else None}
    return {"config": {"model": model_cfg.to_dict(), "train": asdict(trainer.cfg), "data": data},
            "vocab": {"idx2word": corpus.vocab.idx2word, "style": corpus.vocab.style}}


def save(args, trainer, corpus, model_cfg, history, iter_no, dist, log):
    """Write the checkpoint (rank 0); its cache size in MB, or None where nothing is written."""
    state = trainer.state_dict()  # a collective: every rank takes part
    if not (dist.is_main and args.checkpoint):
        return None
    ckpt = {**state, **checkpoint_meta(args, trainer, corpus, model_cfg), "iter_no": iter_no, "logger": history}
    ckpt_io.write_checkpoint(ckpt, Path(args.checkpoint))
    return ckpt_io.cache_megabytes(ckpt)


def log_iteration(args, trainer, model, history, train_nll, val_nll, ms, metrics, log,
                  grad_norm: float = math.nan) -> None:
    unit, steps = args.data_unit, trainer.step
    line = (f"steps: {steps} train: {to_unit(train_nll, unit):.3f}{unit} "
            f"val: {to_unit(val_nll, unit):.3f}{unit} ms/batch: {ms:.1f}")
    stats = model.span_stats()
    if stats:
        line += f" span_avg: {stats['span_avg']:.1f} span_max: {stats['span_max']:.0f}"
    cost = flops.flops_per_token(model)  # forward FLOPs per token at the current spans
    line += " " + cost.log_text()
    if trainer.nonfinite_total:
        line += f" nonfinite_skipped: {trainer.nonfinite_total}"
    log(line)
    history.setdefault("step", []).append(steps)
    history.setdefault(f"train_{unit}", []).append(to_unit(train_nll, unit))
    history.setdefault(f"val_{unit}", []).append(to_unit(val_nll, unit))
    for key, value in stats.items():
        history.setdefault(key, []).append(value)
    metrics.scalars(steps, {f"train/{unit}": to_unit(train_nll, unit), f"val/{unit}": to_unit(val_nll, unit),
                            "train/loss": train_nll, "val/loss": val_nll, "ms_per_batch": ms,
                            "lr": trainer.optimizer.param_groups[0]["lr"],
                            "tokens_per_s": args.batch_sz * args.block_sz / max(ms, 1e-9) * 1000,
                            **{f"span/{k}": v for k, v in stats.items()},
                            "train/grad_norm": grad_norm, **cost.metrics(),
                            **{f"span_{kind}/layer_{l:02d}": value
                               for l, layer in enumerate(model.layer_span_stats())
                               for kind, value in layer.items()}})
    metrics.histogram(steps, "span/heads", [s for layer in model.head_spans() for s in layer])
    if stats and metrics.writer is not None and len(history["step"]) % 10 == 1:  # first, then every 10th
        image = plots.spans_image(model.head_spans(), model.cfg.attn_span)  # None without matplotlib
        if image is not None:
            metrics.image(steps, "span/heads_figure", image)


PROGRESS_EVERY_S = 60.0  # a plain progress line at least this often when stdout is not a terminal
SLOW_ITERATION_S = 600.0  # on a CPU, warn when the first iteration would take longer than this


class Progress:
    """What a log file gets while an iteration runs (a terminal has tqdm's bar): a line
    every PROGRESS_EVERY_S seconds when stdout is not a terminal, and one warning on a CPU
    when the first step shows that the iteration would take more than SLOW_ITERATION_S."""

    def __init__(self, trainer, dist, log):
        self.log, self.nb, self.niter = log, trainer.cfg.nbatches, trainer.cfg.niter
        self.plain = dist.is_main and not sys.stdout.isatty()
        self.check_speed = dist.device.type == "cpu"
        self.last = time.time()

    def step(self, trainer, iteration: int, start: float, steps_run: int) -> None:
        now = time.time()
        per_step = (now - start) / steps_run  # s
        left = (self.nb - trainer.iter_step) * per_step  # s to the end of this iteration
        if self.check_speed:
            self.check_speed = False
            if left + per_step > SLOW_ITERATION_S:
                self.log(f"warning: training on a CPU: the first step took {per_step:.1f} s, so this "
                         f"iteration ({self.nb} steps) ends in about {format_duration(left)}; the "
                         "published configurations (scripts/*.sh) are meant for GPUs")
        if self.plain and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.log(f"progress: iteration {iteration} step {trainer.iter_step}/{self.nb} (step {trainer.step} "
                     f"overall), {per_step * 1000:.0f} ms/step, the iteration ends in about {format_duration(left)}")


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def train(args, trainer, model, corpus, model_cfg, ckpt, dist, log) -> int:
    history = ckpt["logger"] if ckpt else {}
    done = ckpt["iter_no"] + 1 if ckpt else 0
    nb = trainer.cfg.nbatches
    metrics = MetricsLog(tensorboard_dir(args), dist.is_main)
    stop = StopFlag()
    progress = Progress(trainer, dist, log)
    if done >= trainer.cfg.niter:
        log(f"nothing to train: {done} iterations done, --niter {trainer.cfg.niter}")
    while done < trainer.cfg.niter:
        start, steps_run, norms = time.time(), 0, []
        bar = tqdm(total=nb, initial=trainer.iter_step, desc=f"iter {done}", leave=False,
                   disable=None if dist.is_main else True, mininterval=1)
        while trainer.iter_step < nb:
            result = trainer.train_step()
            steps_run += 1
            if math.isfinite(result["grad_norm"]):
                norms.append(result["grad_norm"])
            bar.update(1)
            progress.step(trainer, done, start, steps_run)
            if trainer.nonfinite_in_row >= trainer.cfg.max_nonfinite:
                bar.close()
                raise ConfigError(f"{trainer.nonfinite_in_row} steps in a row had a non-finite loss or "
                                  f"gradient (last grad norm {result['grad_norm']}); stopping. The last good "
                                  "checkpoint is untouched: lower --lr or raise --grad-clip and resume")
            code = stop.agreed(dist)
            if code is not None:
                bar.close()
                save(args, trainer, corpus, model_cfg, history, done - 1, dist, log)
                log(stop_message(args, trainer.step))
                return code
        bar.close()
        ms = (time.time() - start) * 1000 / max(steps_run, 1)
        train_nll = trainer.end_iteration()
        val_nll = trainer.validate(max(1, nb // 10))
        log_iteration(args, trainer, model, history, train_nll, val_nll, ms, metrics, log,
                      grad_norm=sum(norms) / len(norms) if norms else math.nan)
        done += 1
        mb = save(args, trainer, corpus, model_cfg, history, done - 1, dist, log)
        if done == 1 and mb is not None:
            log(f"checkpoint {args.checkpoint}: caches {mb:.1f} MB")
    metrics.close()
    return 0


def run(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, sys.argv[1:] if argv is None else argv)
    check_flag_ranges(args)  # each flag on its own, before any file is read
    dist = init_distributed(args.device)
    log = log_to(dist)
    checkpoint_lock.hold_for_training(args.checkpoint, dist, training=not (args.full_eval_mode or args.dry_run))
    ckpt = None
    if args.checkpoint and not args.dry_run:
        ckpt = (ckpt_io.require_checkpoint(args.checkpoint, log) if args.full_eval_mode
                else ckpt_io.load_checkpoint(Path(args.checkpoint), log))
    if ckpt is not None and not ckpt_io.is_reference(ckpt):
        merge_saved_config(args, explicit, ckpt["config"])
    check_flags(args)
    if args.dry_run:
        return dry_run(args, log)
    local = args.batch_sz // dist.world_size
    if args.batch_sz % dist.world_size or local % args.batch_split:
        raise ConfigError(f"--batch-sz {args.batch_sz} must split evenly over {dist.world_size} ranks "
                          f"and then into --batch-split {args.batch_split}")
    data_cfg = DataConfig(args.data, sort_by_freq=args.adapt_io, split=tuple(args.data_split),
                          cache_dir=args.cache_dir)
    fingerprint = data_fingerprint(data_cfg)
    if ckpt is not None and not ckpt_io.is_reference(ckpt):
        check_same_data(args, ckpt["config"]["data"], fingerprint, log)
    if not args.full_eval_mode:
        check_outputs(args, tensorboard_dir(args))
    corpus = load_data(data_cfg, dist)
    if ckpt is not None and "vocab" in ckpt and ckpt["vocab"]["idx2word"] != corpus.vocab.idx2word:
        raise ConfigError(f"--data {args.data} has another vocabulary than the one {args.checkpoint} "
                          "was trained with; point --data at the training data")
    model, model_cfg, train_cfg = build_model(args, len(corpus.vocab), dist.device)
    if ckpt is not None:
        ckpt_io.load_model_state(model, ckpt, args.checkpoint)
    if args.compile:
        compile_layers(model, log=log)
    ddp_model = wrap_ddp(model, dist)
    log(f"params: {model.num_parameters():,} ({model.num_parameters() / 1e6:.2f}M) "
        f"vocab: {len(corpus.vocab)} ranks: {dist.world_size} device: {dist.device}")
    if args.full_eval_mode:
        code = full_eval(args, ddp_model, model, corpus, dist, log)
        shutdown(dist)  # a process group left to the interpreter's exit can abort a rank
        return code
    seed_everything(train_cfg.seed, dist.rank)
    optimizer = build_optimizer(model.parameters(), train_cfg)
    trainer = Trainer(ddp_model, model, optimizer, train_cfg, dist, corpus.train, corpus.valid)
    if ckpt is not None:
        check_resume(ckpt, train_cfg, args)
        trainer.load_state_dict(ckpt, log)
        if dist.is_main:
            ckpt_io.set_aside_unreadable(ckpt, Path(args.checkpoint), log)
        log(resumed_line(args.checkpoint, trainer, ckpt))
    with StopFlag.restoring():
        code = train(args, trainer, model, corpus, model_cfg, ckpt, dist, log)
    shutdown(dist)
    return code


def load_data(data_cfg: DataConfig, dist):
    if dist.is_main:
        corpus = load_corpus(data_cfg)  # rank 0 tokenises and caches; the others wait
    barrier(dist)
    if not dist.is_main:
        corpus = load_corpus(data_cfg)
    return corpus


def resumed_line(path: str, trainer: Trainer, ckpt: dict) -> str:
    """Which file the run resumed from (the latest, or ``.prev`` when the latest was set
    aside as unreadable) and where it continues: the step count and the iteration it is in."""
    source = Path(path) if Path(path).exists() else previous_path(Path(path))
    return f"resumed from {source} at step {trainer.step} (iteration {ckpt['iter_no'] + 1})"


def check_resume(ckpt: dict, train_cfg: TrainConfig, args) -> None:
    if ckpt_io.is_reference(ckpt):
        if "scheduler_iter" not in ckpt:
            ckpt["scheduler_iter"] = (ckpt["iter_no"] + 1) * train_cfg.nbatches
        return
    saved = ckpt["config"]["train"]
    if saved["batch_size"] != train_cfg.batch_size:
        raise ConfigError(f"--batch-sz {train_cfg.batch_size} differs from the checkpoint's "
                          f"{saved['batch_size']}: the streams and caches cannot be resumed; "
                          "resume with the same global batch (any number of ranks that divides it)")


@record
def main(argv=None) -> int:
    try:
        return run(argv)
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
        checkpoint_lock.release_all()


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
