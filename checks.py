"""Checks of the flags' combinations, the data and the outputs, made before any work starts
(each flag on its own: its field's rule in config.py, ``Settings.check_ranges``).

Each failure is a ``ConfigError`` that main.py prints as one ``error:`` line (exit
status 2) naming the flag or file and what to do; nothing has been written by then.
"""
from pathlib import Path
from typing import Optional

import torch

import checkpoint as ckpt_io
from corpus_cache import describe
from settings import Settings
from utils import ConfigError, DistInfo, unwritable_reason


def check_flags(s: Settings) -> None:
    """Every flag and their combinations (after a checkpoint's configuration is merged)."""
    s.check_ranges()
    m, t, r = s.model, s.train, s.run
    if m.hidden_size % m.nheads:
        raise ConfigError(f"--hid-sz {m.hidden_size} is not divisible by --nheads {m.nheads}")
    if t.batch_size % t.batch_split:
        raise ConfigError(f"--batch-sz {t.batch_size} is not divisible by --batch-split {t.batch_split}")
    if m.adapt_span and m.adapt_span_ramp > m.attn_span:
        raise ConfigError(f"--adapt-span-ramp {m.adapt_span_ramp} is longer than --attn-span "
                          f"{m.attn_span}; give a ramp of at most the span")
    if m.adapt_span_dynamic and not m.adapt_span:
        raise ConfigError("--adapt-span-dynamic needs --adapt-span")
    if m.adapt_span_dynamic and r.compile:
        raise ConfigError("--compile does not support --adapt-span-dynamic (its windows follow each "
                          "block's input); drop one of the two")
    if m.expire_span and m.adapt_span:
        raise ConfigError("--expire-span and --adapt-span are two ways of learning the context; drop one of the two")
    if m.expire_span and r.compile:
        raise ConfigError("--compile does not support --expire-span (its memory length changes every block); "
                          "drop one of the two")
    if m.adapt_io_tied and not m.adapt_io:
        raise ConfigError("--adapt-io-tied needs --adapt-io")
    if r.eval_other_data and not r.full_eval_mode:
        raise ConfigError("--eval-other-data is for evaluation (--full-eval-mode): a run resumes on its own data")
    if r.full_eval_mode and not r.checkpoint:
        raise ConfigError("--full-eval-mode needs --checkpoint PATH (the model to evaluate)")
    if t.amp != "none" and not torch.cuda.is_available():
        raise ConfigError(f"--amp {t.amp} needs a CUDA device; drop it on CPU")


def check_batch(s: Settings, dist: DistInfo) -> None:
    """The global batch splits over the ranks and then into --batch-split passes."""
    batch, split = s.train.batch_size, s.train.batch_split
    if batch % dist.world_size or (batch // dist.world_size) % split:
        raise ConfigError(f"--batch-sz {batch} must split evenly over {dist.world_size} ranks "
                          f"and then into --batch-split {split}")


def check_same_data(s: Settings, saved: dict, fp: dict, log=print) -> None:
    """The data of ``--data`` are those the checkpoint was trained on (when it says so);
    ``--eval-other-data`` lets an evaluation use other data, with a warning."""
    want, data, run = saved.get("fingerprint"), s.data.path, s.run
    if not want or (want["size"], want["sha256"]) == (fp["size"], fp["sha256"]):
        return
    if run.full_eval_mode and run.eval_other_data:
        log(f"warning: evaluating on --data {data} ({describe(fp)}), not on the checkpoint's training "
            f"data ({saved['path']}: {describe(want)})")
        return
    hint = " (to evaluate on other data on purpose, add --eval-other-data)" if run.full_eval_mode else ""
    raise ConfigError(f"--data {data} ({describe(fp)}) is not the data the checkpoint "
                      f"{run.checkpoint} was trained on ({saved['path']}: {describe(want)}); "
                      f"point --data at the training data, or use another --checkpoint{hint}")


def check_vocab(s: Settings, ckpt: Optional[dict], idx2word: list) -> None:
    """The data's vocabulary is the checkpoint's (where it carries one)."""
    if ckpt is not None and "vocab" in ckpt and ckpt["vocab"]["idx2word"] != idx2word:
        raise ConfigError(f"--data {s.data.path} has another vocabulary than the one {s.run.checkpoint} "
                          "was trained with; point --data at the training data")


def tensorboard_dir(s: Settings) -> Optional[Path]:
    """--tensorboard-dir, else ``<checkpoint stem>.logs`` beside the checkpoint, else none."""
    if s.run.tensorboard_dir:
        return Path(s.run.tensorboard_dir)
    if s.run.checkpoint:
        path = Path(s.run.checkpoint)
        return path.with_name(path.stem + ".logs")
    return None


def check_outputs(s: Settings) -> None:
    """The checkpoint and the TensorBoard folder can be written (checked, not written)."""
    if s.run.checkpoint:
        ckpt_io.check_writable(s.run.checkpoint)
    tensorboard = tensorboard_dir(s)
    if tensorboard is not None:
        if tensorboard.exists() and not tensorboard.is_dir():
            raise ConfigError(f"--tensorboard-dir {tensorboard} is a file; give a folder")
        reason = unwritable_reason(tensorboard)
        if reason:
            raise ConfigError(f"the TensorBoard folder {tensorboard} cannot be written: {reason}; "
                              "choose another --tensorboard-dir")
