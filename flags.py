"""main.py's command line: its flags in the groups --help shows, with a one-line help each.

A new flag is one ``a(...)`` line in the function of its group. ``add_flag_groups`` adds
some or all groups to a parser (scripts/generate.py shows the model groups under one title
after its own flags). ``HelpFormatter`` ends every help with the flag's default.
"""
import argparse

from models import ATTN_IMPLS, ModelConfig


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends every flag's help with its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or not action.option_strings or "(default" in text:
            return text
        default = action.default
        if action.nargs == 0:  # a switch
            shown = "on" if default else "off"
        elif default in ("", None):
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _get_default_metavar_for_optional(self, action):
        return {int: "N", float: "X"}.get(action.type, "PATH")


# One function per group of flags, in the order --help shows them. A new flag is one
# `a(...)` line in the function of its group.
def data_flags(a) -> None:
    a("--data", default="data/text8",
      help="a reference-format folder ({train,valid,test}.txt), a WikiText folder, or any text file")
    a("--data-unit", choices=["bpc", "ppl"], default="bpc",
      help="report bits per token (bpc) or perplexity (ppl); the loss is the same")
    a("--data-split", type=float, nargs=3, default=[0.9, 0.05, 0.05], metavar=("TRAIN", "VALID", "TEST"),
      help="fractions of a plain text file used for train, valid and test")
    a("--cache-dir", default=None, metavar="DIR",
      help="token cache folder; none means $ADAPTIVE_SPAN_CACHE, else $XDG_CACHE_HOME/adaptive-span "
           "or ~/.cache/adaptive-span")


def model_flags(a) -> None:
    a("--nlayers", type=int, default=8, help="number of layers")
    a("--hid-sz", type=int, default=256, help="hidden size H (a multiple of --nheads)")
    a("--inner-hid-sz", type=int, default=1024,
      help="feed-forward inner size (unused with --pers-mem-size > 0, which removes the feed-forward)")
    a("--nheads", type=int, default=2, help="attention heads per layer")
    a("--attn-span", type=int, default=32, help="maximum attention span L, in tokens")
    a("--block-sz", type=int, default=64,
      help="block length M: tokens processed in parallel per stream; a cache carries the context")
    a("--dropout", type=float, default=0.2,
      help="dropout on attention probabilities, feed-forward activations and persistent memory")
    a("--emb-dropout", type=float, default=0.0, help="dropout on the input embeddings and the final hidden states")
    a("--attn-impl", choices=sorted(ATTN_IMPLS), default=ModelConfig.attn_impl,
      help="grouped: each head pays only for its own span; reference: the published computation")
    a("--compile", action="store_true",
      help="torch.compile every layer (static shapes, one graph per window plan; for long GPU runs)")


def adaptive_span_flags(a) -> None:
    a("--adapt-span", action="store_true", help="learn each head's span (otherwise every head attends L tokens)")
    a("--adapt-span-loss", type=float, default=0.0, help="coefficient of the L1 penalty on the spans")
    a("--adapt-span-ramp", type=int, default=32, help="length R of the soft mask's ramp, in tokens")
    a("--adapt-span-init", type=float, default=0.0, help="initial span, as a fraction of L")
    a("--adapt-span-cache", action="store_true", help="keep only the cache the learned spans need (+64)")
    a("--adapt-span-dynamic", action="store_true",
      help="spans that depend on the input, z = L sigmoid(v.x + b) per head and position (with --adapt-span)")


def persistent_memory_flags(a) -> None:
    a("--pers-mem-size", type=int, default=0,
      help="persistent key/value vectors per head and layer; > 0 removes the feed-forward sublayer")
    a("--pers-mem-keep-ff", action="store_true", help="keep the feed-forward sublayer with persistent memory")


def adaptive_io_flags(a) -> None:
    a("--adapt-io", action="store_true",
      help="adaptive input and adaptive softmax (word level); sorts the vocabulary by frequency")
    a("--adapt-io-tied", action="store_true", help="share embeddings and projections between input and output")
    a("--adapt-io-divval", type=int, default=4, help="each cluster's embedding is this many times smaller")
    a("--adapt-io-cutoffs", type=int, nargs="+", default=[20000, 40000, 200000],
      help="frequency ranks where the clusters start")


def optimisation_flags(a) -> None:
    a("--optim", choices=["sgd", "adagrad", "adam"], default="sgd", help="optimizer")
    a("--lr", type=float, default=0.03, help="learning rate")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--lr-warmup", type=int, default=0, help="linear warm-up of the learning rate over this many steps")
    a("--grad-clip", type=float, default=0.0,
      help="gradient clipping (0: none); per parameter with adagrad, global norm otherwise")
    a("--batch-sz", type=int, default=64, help="global batch: parallel streams over all ranks")
    a("--batch-split", type=int, default=1, help="split each rank's batch into this many passes (saves memory)")
    a("--nbatches", type=int, default=1000, help="steps per iteration (one log line, validation and checkpoint)")
    a("--niter", type=int, default=1000, help="total iterations; a resumed run continues up to it")
    a("--seed", type=int, default=1111, help="random seed (weights, data order, dropout)")
    a("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision (autocast), CUDA only")
    a("--max-nonfinite", type=int, default=10, help="stop after this many non-finite steps in a row")


def evaluation_flags(a) -> None:
    a("--full-eval-mode", action="store_true",
      help="evaluate --checkpoint on the whole valid and test sets and exit")
    a("--reference-eval", action="store_true",
      help="the published protocol: full blocks only, mean of the per-block means")
    a("--eval-other-data", action="store_true",
      help="with --full-eval-mode: evaluate on other data than the checkpoint was trained on, on purpose")


def checkpoint_flags(a) -> None:
    a("--checkpoint", default="", help="checkpoint file: written every iteration, resumed when it exists")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    a("--distributed", action="store_true", help="accepted; ranks are read from the launcher's environment")
    a("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def logging_flags(a) -> None:
    a("--tensorboard-dir", default="", metavar="DIR",
      help="folder for TensorBoard events and metrics.jsonl; none means <checkpoint stem>.logs beside the checkpoint")
    a("--dry-run", action="store_true", help="check the flags, print the parameter count and exit")
    a("--vocab-size", type=int, default=0, help="vocabulary size for --dry-run without data")


FLAG_GROUPS = [  # (title, description, function): the groups of --help, in order
    ("data", "the text to train on (docs/data.md)", data_flags),
    ("model", "the Transformer: relative-position attention over a cache of past blocks", model_flags),
    ("adaptive span", "each head learns how far back it attends (Sukhbaatar et al., 2019)",
     adaptive_span_flags),
    ("persistent memory", "all-attention layers: learned key/value vectors in every attention layer",
     persistent_memory_flags),
    ("adaptive input/softmax", "word-level models with large vocabularies (docs/modules.md)", adaptive_io_flags),
    ("optimisation", "one step = one block of --block-sz tokens in each of --batch-sz streams", optimisation_flags),
    ("evaluation", "whole valid and test sets (docs/evaluation.md)", evaluation_flags),
    ("checkpoints and distribution", "resume, several processes (docs/clusters.md)", checkpoint_flags),
    ("logging", "what is printed and written (docs/observing.md)", logging_flags)]
MODEL_GROUPS = ("model", "adaptive span", "persistent memory", "adaptive input/softmax")


def add_flag_groups(parser: argparse.ArgumentParser, titles=None, title: str = "", hidden: bool = False) -> None:
    """Add main.py's flags of the groups ``titles`` (default: all) to ``parser``: each group
    under its own title, or all of them under ``title``; ``hidden`` parses them without
    listing them in --help. Flags the parser already has are left as they are."""
    single = parser.add_argument_group(title) if title else None
    for name, description, add in FLAG_GROUPS:
        if titles is not None and name not in titles:
            continue
        group = single or (parser if hidden else parser.add_argument_group(name, description))

        def a(*names, **kwargs):
            if any(n in parser._option_string_actions for n in names):
                return
            group.add_argument(*names, **{**kwargs, **({"help": argparse.SUPPRESS} if hidden else {})})
        add(a)
