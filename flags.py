"""main.py's command line, built from the fields of config.py: each flag with its field's
default and help, in the --help group its field names. ``add_flag_groups`` adds some or all
groups to another parser (scripts/generate.py shows the model groups under one title after
its own flags); ``explicit_flags`` tells which flags a command line gave. No heavy imports.
"""
import argparse
from dataclasses import MISSING, Field
from typing import List, Optional, Sequence

from config import GROUPS
from settings import all_flag_fields, dest

DESCRIPTION = """Train or evaluate a Transformer with adaptive attention span and persistent memory.

    python main.py --data data/enwik8 --checkpoint checkpoints/run.pt --adapt-span ...
    python scripts/launch_ranks.py --standalone --nproc_per_node=8 main.py ...   # one process per GPU
    python main.py --checkpoint checkpoints/run.pt --full-eval-mode

Every flag of the reference implementation keeps its spelling, default and meaning."""
EPILOG = """examples:
  python main.py --data notes.txt --checkpoint runs/notes.pt --nlayers 3 --hid-sz 128 --niter 5
  python main.py --checkpoint runs/notes.pt --full-eval-mode    # a checkpoint carries its flags
  python scripts/launch_ranks.py --standalone --nproc_per_node=2 main.py --data notes.txt \\
      --checkpoint runs/notes.pt                                 # two ranks, errors in one line
  bash scripts/enwik8.sh --dry-run                               # a published configuration
Documentation: README.md and docs/."""


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


def field_default(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


def flag_arguments(f: Field) -> dict:
    """The add_argument keywords of a field's flag."""
    meta, default = f.metadata, field_default(f)
    kwargs = {"dest": dest(f), "default": default, "help": argparse.SUPPRESS if meta["hidden"] else meta["help"]}
    if isinstance(default, bool):
        return {**kwargs, "action": "store_true"}
    sample = default[0] if isinstance(default, list) else default
    if isinstance(sample, (int, float)):
        kwargs["type"] = type(sample)
    for key in ("choices", "nargs", "metavar"):
        if meta[key] is not None:
            kwargs[key] = meta[key]
    return kwargs


def group_fields(title: str) -> List[Field]:
    return [f for _, f in all_flag_fields() if f.metadata["group"] == title]


# (title, description, dests): the groups of --help, in order, with their flags
FLAG_GROUPS = [(title, description, tuple(dest(f) for f in group_fields(title))) for title, description in GROUPS]
MODEL_GROUPS = ("model", "adaptive span", "expire span", "persistent memory", "adaptive input/softmax")


def add_flag_groups(parser: argparse.ArgumentParser, titles: Optional[Sequence[str]] = None, title: str = "",
                    hidden: bool = False, given_only: bool = False) -> None:
    """Add main.py's flags of the groups ``titles`` (default: all) to ``parser``: each group
    under its own title, or all of them under ``title``; ``hidden`` parses them without
    listing them in --help; ``given_only`` leaves a flag out of the namespace unless given.
    Flags the parser already has are left as they are."""
    single = parser.add_argument_group(title) if title else None
    for name, description, _ in FLAG_GROUPS:
        if titles is not None and name not in titles:
            continue
        group = single or (parser if hidden else parser.add_argument_group(name, description))
        for f in group_fields(name):
            kwargs = flag_arguments(f)
            if hidden:
                kwargs["help"] = argparse.SUPPRESS
            if given_only:
                kwargs["default"] = argparse.SUPPRESS
            try:
                group.add_argument(f.metadata["flag"], *f.metadata["aliases"], **kwargs)
            except argparse.ArgumentError:  # the parser has its own flag of that name
                pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter,
                                     usage="python main.py [flags]")
    add_flag_groups(parser)
    return parser


def explicit_flags(argv: Sequence[str]) -> set:
    """The dests of main.py's flags that ``argv`` gives (other flags in it are ignored)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_flag_groups(probe, hidden=True, given_only=True)
    return set(vars(probe.parse_known_args(list(argv))[0]))
