"""Checks of the command line, the data and the outputs, made before any work starts.

Each failure is a ``ConfigError`` that main.py prints as one ``error:`` line (exit
status 2) naming the flag or file and what to do; nothing has been written by then.
"""
import math
from pathlib import Path

import torch

import checkpoint as ckpt_io
from corpus_cache import describe
from data import check_split
from utils import ConfigError, unwritable_reason

# flags that count something and where zero or less means nothing
POSITIVE_COUNTS = ("hid_sz", "inner_hid_sz", "nlayers", "nheads", "attn_span", "block_sz", "batch_sz",
                   "batch_split", "nbatches", "niter", "adapt_span_ramp", "adapt_io_divval", "max_nonfinite")
NON_NEGATIVE = ("pers_mem_size", "lr_warmup", "grad_clip", "momentum", "adapt_span_loss", "vocab_size")


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flag_ranges(args) -> None:
    """Each flag on its own: counts, probabilities, rates."""
    for dest in POSITIVE_COUNTS:
        if getattr(args, dest) < 1:
            raise ConfigError(f"{flag(dest)} must be at least 1, got {getattr(args, dest)}")
    for dest in NON_NEGATIVE:
        if getattr(args, dest) < 0:
            raise ConfigError(f"{flag(dest)} must not be negative, got {getattr(args, dest)}")
    for dest in ("dropout", "emb_dropout"):
        value = getattr(args, dest)
        if not 0 <= value < 1:
            raise ConfigError(f"{flag(dest)} is a probability in [0, 1), got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.adapt_span_init <= 1:
        raise ConfigError(f"--adapt-span-init is a fraction of --attn-span in [0, 1], got {args.adapt_span_init}")
    if min(args.adapt_io_cutoffs) < 1:
        raise ConfigError(f"--adapt-io-cutoffs must be positive, got {args.adapt_io_cutoffs}")
    check_split(args.data_split)


def check_flags(args) -> None:
    """Every flag and their combinations (after a checkpoint's configuration is merged)."""
    check_flag_ranges(args)
    if args.hid_sz % args.nheads:
        raise ConfigError(f"--hid-sz {args.hid_sz} is not divisible by --nheads {args.nheads}")
    if args.batch_sz % args.batch_split:
        raise ConfigError(f"--batch-sz {args.batch_sz} is not divisible by --batch-split {args.batch_split}")
    if args.adapt_span and args.adapt_span_ramp > args.attn_span:
        raise ConfigError(f"--adapt-span-ramp {args.adapt_span_ramp} is longer than --attn-span "
                          f"{args.attn_span}; give a ramp of at most the span")
    if args.adapt_span_dynamic and not args.adapt_span:
        raise ConfigError("--adapt-span-dynamic needs --adapt-span")
    if args.adapt_span_dynamic and args.compile:
        raise ConfigError("--compile does not support --adapt-span-dynamic (its windows follow each "
                          "block's input); drop one of the two")
    if args.adapt_io_tied and not args.adapt_io:
        raise ConfigError("--adapt-io-tied needs --adapt-io")
    if args.eval_other_data and not args.full_eval_mode:
        raise ConfigError("--eval-other-data is for evaluation (--full-eval-mode): a run resumes on its own data")
    if args.full_eval_mode and not args.checkpoint:
        raise ConfigError("--full-eval-mode needs --checkpoint PATH (the model to evaluate)")
    if args.amp != "none" and not torch.cuda.is_available():
        raise ConfigError(f"--amp {args.amp} needs a CUDA device; drop it on CPU")


def check_same_data(args, saved: dict, fp: dict, log=print) -> None:
    """The data of ``--data`` are those the checkpoint was trained on (when it says so);
    ``--eval-other-data`` lets an evaluation use other data, with a warning."""
    want = saved.get("fingerprint")
    if not want or (want["size"], want["sha256"]) == (fp["size"], fp["sha256"]):
        return
    if args.full_eval_mode and args.eval_other_data:
        log(f"warning: evaluating on --data {args.data} ({describe(fp)}), not on the checkpoint's training "
            f"data ({saved['path']}: {describe(want)})")
        return
    hint = " (to evaluate on other data on purpose, add --eval-other-data)" if args.full_eval_mode else ""
    raise ConfigError(f"--data {args.data} ({describe(fp)}) is not the data the checkpoint "
                      f"{args.checkpoint} was trained on ({saved['path']}: {describe(want)}); "
                      f"point --data at the training data, or use another --checkpoint{hint}")


def check_outputs(args, tensorboard: Path) -> None:
    """The checkpoint and the TensorBoard folder can be written (checked, not written)."""
    if args.checkpoint:
        ckpt_io.check_writable(args.checkpoint)
    if tensorboard is not None:
        if tensorboard.exists() and not tensorboard.is_dir():
            raise ConfigError(f"--tensorboard-dir {tensorboard} is a file; give a folder")
        reason = unwritable_reason(tensorboard)
        if reason:
            raise ConfigError(f"the TensorBoard folder {tensorboard} cannot be written: {reason}; "
                              "choose another --tensorboard-dir")
