"""What a run builds from its settings: the torch threads, the data on every rank, the model
(also for scripts/generate.py and scripts/study.py), and --dry-run's report."""
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from data import Corpus, DataConfig, load_corpus
from models import ModelConfig, TransformerSeq
from settings import Settings
from utils import ConfigError, DistInfo, barrier


def use_threads(requested: int, ckpt: Optional[dict] = None) -> str:
    """Set torch's CPU threads (threads.py) and return the text of the parameters line. A
    resumed run keeps the count of the run it continues unless --threads or OMP_NUM_THREADS
    says otherwise: CPU sums round differently with another count, and a resume is bitwise."""
    import threads
    if requested <= 0 and ckpt and ckpt.get("threads") and threads.source(0) == "cores":
        torch.set_num_threads(int(ckpt["threads"]))
        return f"threads: {ckpt['threads']} (as the run this one resumes)"
    return threads.apply_threads(requested, threads.local_world_size())


def load_data(cfg: DataConfig, dist: DistInfo) -> Corpus:
    if dist.is_main:
        corpus = load_corpus(cfg)  # rank 0 tokenises and caches; the others wait
    barrier(dist)
    if not dist.is_main:
        corpus = load_corpus(cfg)
    return corpus


def model_config(s: Settings, vocab_size: int) -> ModelConfig:
    return dataclasses.replace(s.model, vocab_size=vocab_size)


def build_model(s: Settings, vocab_size: int, device):
    """The model of the settings for a vocabulary of ``vocab_size`` (which the settings take:
    the checkpoint stores it), on ``device``, with the same initial weights on every rank;
    its config."""
    s.model.vocab_size = vocab_size
    cfg = model_config(s, vocab_size)
    torch.manual_seed(s.train.seed)  # the same initial weights on every rank
    try:
        model = TransformerSeq(cfg)
    except (NotImplementedError, ValueError) as err:
        raise ConfigError(f"the model flags are inconsistent: {err}") from None
    return model.to(device), cfg


def dry_run(s: Settings, log) -> int:
    """--dry-run: the model's configuration and parameter count, without training."""
    vocab = s.run.vocab_size or (len(load_corpus(s.data).vocab) if Path(s.data.path).exists() else 0)
    if not vocab:
        raise ConfigError(f"--dry-run needs --vocab-size N when --data {s.data.path} does not exist")
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model, cfg = build_model(s, vocab, "meta")
    n = model.num_parameters()
    log(f"model: {cfg}")
    log(f"params: {n:,} ({n / 1e6:.2f}M)")
    return 0
