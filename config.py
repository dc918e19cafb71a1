"""Every setting of main.py, written once: typed dataclasses (data, model, train, run) whose
fields carry the flag, its default and help, its --help group and its rules (a range; whether
a resumed or evaluated run may change it). flags.py builds the command line from them and
settings.py the range checks, the stored configuration and its merge on resume. A new flag is
one field here. No heavy imports: ``python main.py --help`` answers before torch is loaded.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Optional, Sequence

from errors import ConfigError

# the groups of --help, in order: (title, description)
GROUPS = [
    ("data", "the text to train on (docs/data.md)"),
    ("model", "the Transformer: relative-position attention over a cache of past blocks"),
    ("adaptive span", "each head learns how far back it attends (Sukhbaatar et al., 2019)"),
    ("expire span", "each memory learns how long it stays (Sukhbaatar et al., 2021; docs/modules.md)"),
    ("persistent memory", "all-attention layers: learned key/value vectors in every attention layer"),
    ("adaptive input/softmax", "word-level models with large vocabularies (docs/modules.md)"),
    ("optimisation", "one step = one block of --block-sz tokens in each of --batch-sz streams"),
    ("evaluation", "whole valid and test sets (docs/evaluation.md)"),
    ("checkpoints and distribution", "resume, several processes (docs/clusters.md)"),
    ("logging", "what is printed and written (docs/observing.md)")]
ATTN_IMPL_NAMES = ("grouped", "reference")  # the keys of models.ATTN_IMPLS


# ---- rules ----------------------------------------------------------------------------
def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)
    return str(value)


@dataclass(frozen=True)
class Rule:
    """The range of one flag: ``ok(value)``, else the error ``message`` ({flag}, {value})."""
    ok: Callable[[Any], bool]
    message: str

    def check(self, flag: str, value: Any) -> None:
        if not self.ok(value):
            raise ConfigError(self.message.format(flag=flag, value=show(value)))


def at_least(n: int) -> Rule:
    text = "{flag} must not be negative, got {value}" if n == 0 else f"{{flag}} must be at least {n}, got {{value}}"
    return Rule(lambda v: v >= n, text)


def valid_split(split: Sequence[float]) -> bool:
    """Three positive fractions that sum to 1."""
    return len(split) == 3 and min(split) > 0 and math.isclose(sum(split), 1.0, abs_tol=1e-6)


COUNT, NON_NEGATIVE = at_least(1), at_least(0)
PROBABILITY = Rule(lambda v: 0 <= v < 1, "{flag} is a probability in [0, 1), got {value}")
POSITIVE = Rule(lambda v: math.isfinite(v) and v > 0, "{flag} must be positive, got {value}")
OPEN_FRACTION = Rule(lambda v: 0 < v < 1, "{flag} is a fraction of --attn-lim in (0, 1), got {value}")
FRACTION = Rule(lambda v: 0 <= v <= 1, "{flag} is a fraction of --attn-span in [0, 1], got {value}")
POSITIVE_LIST = Rule(lambda v: min(v) >= 1, "{flag} must be positive, got {value}")
SPLIT = Rule(valid_split, "{flag} {value}: give three positive fractions (train, valid, test) that sum "
                          "to 1, e.g. --data-split 0.9 0.05 0.05")


def setting(default: Any, flag: str, help: str, group: str, *, rule: Optional[Rule] = None,
            may_change: bool = True, stored: bool = True, choices: Optional[Sequence[str]] = None,
            nargs: Any = None, metavar: Any = None, aliases: Sequence[str] = (), hidden: bool = False):
    """A dataclass field that is a flag. ``may_change``: a resumed or evaluated run may give
    another value than its checkpoint's (else that is an error); ``stored``: the checkpoint
    keeps it (in a stored section); ``hidden``: parsed but not listed in --help."""
    meta = dict(flag=flag, help=help, group=group, rule=rule, may_change=may_change, stored=stored,
                choices=choices, nargs=nargs, metavar=metavar, aliases=tuple(aliases), hidden=hidden)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def fixed(default: Any, flag: str, help: str, group: str, **kwargs):
    """A model setting that a resumed or evaluated run must keep."""
    return setting(default, flag, help, group, may_change=False, **kwargs)


# ---- the settings -----------------------------------------------------------------------
@dataclass
class DataConfig:
    path: str = setting("data/text8", "--data", "a reference-format folder ({train,valid,test}.txt), "
                        "a WikiText folder, or any text file", "data")
    unit: str = setting("bpc", "--data-unit", "report bits per token (bpc) or perplexity (ppl); the loss "
                        "is the same", "data", choices=("bpc", "ppl"))
    split: List[float] = setting([0.9, 0.05, 0.05], "--data-split", "fractions of a plain text file used "
                                 "for train, valid and test", "data", rule=SPLIT, nargs=3, may_change=False,
                                 metavar=("TRAIN", "VALID", "TEST"))
    cache_dir: Optional[str] = setting(None, "--cache-dir", "token cache folder; none means "
                                       "$ADAPTIVE_SPAN_CACHE, else $XDG_CACHE_HOME/adaptive-span or "
                                       "~/.cache/adaptive-span", "data", metavar="DIR", stored=False)
    sort_by_freq: bool = False  # no flag: --adapt-io sorts the vocabulary by frequency


@dataclass
class ModelConfig:
    vocab_size: int = 0  # no flag: the data's
    hidden_size: int = fixed(256, "--hid-sz", "hidden size H (a multiple of --nheads)", "model", rule=COUNT)
    inner_hidden_size: int = fixed(1024, "--inner-hid-sz", "feed-forward inner size (unused with "
                                   "--pers-mem-size > 0, which removes the feed-forward)", "model", rule=COUNT)
    nlayers: int = fixed(8, "--nlayers", "number of layers", "model", rule=COUNT)
    nheads: int = fixed(2, "--nheads", "attention heads per layer", "model", rule=COUNT)
    attn_span: int = fixed(32, "--attn-span", "maximum attention span L, in tokens", "model", rule=COUNT)
    dropout: float = setting(0.2, "--dropout", "dropout on attention probabilities, feed-forward "
                             "activations and persistent memory", "model", rule=PROBABILITY)
    emb_dropout: float = setting(0.0, "--emb-dropout", "dropout on the input embeddings and the final "
                                 "hidden states", "model", rule=PROBABILITY)
    adapt_span: bool = fixed(False, "--adapt-span", "learn each head's span (otherwise every head attends "
                             "L tokens)", "adaptive span")
    adapt_span_loss: float = setting(0.0, "--adapt-span-loss", "coefficient of the L1 penalty on the spans",
                                     "adaptive span", rule=NON_NEGATIVE)
    adapt_span_ramp: int = fixed(32, "--adapt-span-ramp", "length R of the soft mask's ramp, in tokens",
                                 "adaptive span", rule=COUNT)
    adapt_span_init: float = fixed(0.0, "--adapt-span-init", "initial span, as a fraction of L",
                                   "adaptive span", rule=FRACTION)
    adapt_span_cache: bool = fixed(False, "--adapt-span-cache", "keep only the cache the learned spans "
                                   "need (+64)", "adaptive span")
    adapt_span_dynamic: bool = fixed(False, "--adapt-span-dynamic", "spans that depend on the input, "
                                     "z = L sigmoid(v.x + b) per head and position (with --adapt-span)",
                                     "adaptive span")
    expire_span: bool = fixed(False, "--expire-span", "each memory gets a span e = L sigmoid(w.h/s + b) and is "
                              "dropped once every later query's mask is 0 (not with --adapt-span)", "expire span")
    attn_lim: int = fixed(16384, "--attn-lim", "the longest expire span L, in tokens (--attn-span position "
                          "embeddings cover the nearest distances; beyond, content only)", "expire span",
                          rule=COUNT)
    expire_span_pre_div: float = fixed(1.0, "--expire-span-pre-div", "s: the hidden state is divided by it "
                                       "before the span predictor", "expire span", rule=POSITIVE)
    expire_span_init_percentage: float = fixed(0.1, "--expire-span-init-percentage", "initial span, as a "
                                               "fraction of --attn-lim", "expire span", rule=OPEN_FRACTION)
    expire_span_ramp: int = fixed(32, "--expire-span-ramp", "length R of the expire mask's ramp, in tokens",
                                  "expire span", rule=COUNT)
    expire_span_loss: float = setting(0.0, "--expire-span-loss", "coefficient of the auxiliary loss on the "
                                      "spans inside the ramp", "expire span", rule=NON_NEGATIVE)
    expire_span_noisy: bool = setting(False, "--expire-span-noisy", "in training, clamp the spans to a random "
                                      "fraction of --attn-lim, drawn per block and layer", "expire span")
    pers_mem_size: int = fixed(0, "--pers-mem-size", "persistent key/value vectors per head and layer; > 0 "
                               "removes the feed-forward sublayer", "persistent memory", rule=NON_NEGATIVE)
    pers_mem_keep_ff: bool = fixed(False, "--pers-mem-keep-ff", "keep the feed-forward sublayer with "
                                   "persistent memory", "persistent memory")
    attn_impl: str = setting("grouped", "--attn-impl", "grouped: each head pays only for its own span; "
                             "reference: the published computation", "model", choices=ATTN_IMPL_NAMES)
    adapt_io: bool = fixed(False, "--adapt-io", "adaptive input and adaptive softmax (word level); sorts "
                           "the vocabulary by frequency", "adaptive input/softmax")
    adapt_io_tied: bool = fixed(False, "--adapt-io-tied", "share embeddings and projections between input "
                                "and output", "adaptive input/softmax")
    adapt_io_divval: int = fixed(4, "--adapt-io-divval", "each cluster's embedding is this many times "
                                 "smaller", "adaptive input/softmax", rule=COUNT)
    adapt_io_cutoffs: List[int] = fixed([20000, 40000, 200000], "--adapt-io-cutoffs", "frequency ranks where "
                                        "the clusters start", "adaptive input/softmax", rule=POSITIVE_LIST,
                                        nargs="+")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.nheads

    @property
    def has_ff(self) -> bool:
        return self.pers_mem_size == 0 or self.pers_mem_keep_ff

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    optim: str = setting("sgd", "--optim", "optimizer", "optimisation", choices=("sgd", "adagrad", "adam"))
    lr: float = setting(0.03, "--lr", "learning rate", "optimisation", rule=POSITIVE)
    momentum: float = setting(0.9, "--momentum", "SGD momentum", "optimisation", rule=NON_NEGATIVE)
    grad_clip: float = setting(0.0, "--grad-clip", "gradient clipping (0: none); per parameter with "
                               "adagrad, global norm otherwise", "optimisation", rule=NON_NEGATIVE)
    lr_warmup: int = setting(0, "--lr-warmup", "linear warm-up of the learning rate over this many steps",
                             "optimisation", rule=NON_NEGATIVE)
    batch_size: int = setting(64, "--batch-sz", "global batch: parallel streams over all ranks",
                              "optimisation", rule=COUNT)
    batch_split: int = setting(1, "--batch-split", "split each rank's batch into this many passes (saves "
                               "memory)", "optimisation", rule=COUNT)
    block_size: int = setting(64, "--block-sz", "block length M: tokens processed in parallel per stream; "
                              "a cache carries the context", "model", rule=COUNT)
    nbatches: int = setting(1000, "--nbatches", "steps per iteration (one log line, validation and "
                            "checkpoint)", "optimisation", rule=COUNT)
    niter: int = setting(1000, "--niter", "total iterations; a resumed run continues up to it",
                         "optimisation", rule=COUNT)
    seed: int = setting(1111, "--seed", "random seed (weights, data order, dropout)", "optimisation")
    max_nonfinite: int = setting(10, "--max-nonfinite", "stop after this many non-finite steps in a row",
                                 "optimisation", rule=COUNT)
    amp: str = setting("none", "--amp", "mixed precision (autocast), CUDA only", "optimisation",
                       choices=("none", "bf16", "fp16"))


@dataclass
class RunConfig:
    """How this process runs: nothing of it is stored in the checkpoint."""
    compile: bool = setting(False, "--compile", "torch.compile every layer (static shapes, one graph per "
                            "window plan; for long GPU runs)", "model")
    full_eval_mode: bool = setting(False, "--full-eval-mode", "evaluate --checkpoint on the whole valid "
                                   "and test sets and exit", "evaluation")
    reference_eval: bool = setting(False, "--reference-eval", "the published protocol: full blocks only, "
                                   "mean of the per-block means", "evaluation")
    eval_other_data: bool = setting(False, "--eval-other-data", "with --full-eval-mode: evaluate on other "
                                    "data than the checkpoint was trained on, on purpose", "evaluation")
    checkpoint: str = setting("", "--checkpoint", "checkpoint file: written every iteration, resumed when "
                              "it exists", "checkpoints and distribution")
    device: str = setting("auto", "--device", "auto: CUDA when available", "checkpoints and distribution",
                          choices=("auto", "cpu", "cuda"))
    threads: int = setting(0, "--threads", "torch CPU threads per process (0: chosen automatically)",
                           "checkpoints and distribution", rule=NON_NEGATIVE)
    distributed: bool = setting(False, "--distributed", "accepted; ranks are read from the launcher's "
                                "environment", "checkpoints and distribution")
    local_rank: int = setting(0, "--local_rank", "the launcher's; LOCAL_RANK is read instead",
                              "checkpoints and distribution", aliases=("--local-rank",), hidden=True)
    tensorboard_dir: str = setting("", "--tensorboard-dir", "folder for TensorBoard events and "
                                   "metrics.jsonl; none means <checkpoint stem>.logs beside the checkpoint",
                                   "logging", metavar="DIR")
    dry_run: bool = setting(False, "--dry-run", "check the flags, print the parameter count and exit",
                            "logging")
    vocab_size: int = setting(0, "--vocab-size", "vocabulary size for --dry-run without data", "logging",
                              rule=NON_NEGATIVE)
