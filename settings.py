"""The four sections of config.py as one object: read from the parsed command line, checked
field by field, stored in a checkpoint and merged back from one on resume or evaluation.
No heavy imports (see config.py).
"""
import copy
from dataclasses import Field, asdict, dataclass, fields
from typing import Iterator, Tuple

from config import DataConfig, ModelConfig, RunConfig, TrainConfig, show
from errors import ConfigError

SECTIONS = (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig), ("run", RunConfig))
STORED = ("model", "train", "data")  # the sections a checkpoint keeps ("config" entry)


def flag_fields(cls) -> Iterator[Field]:
    """The fields of a config dataclass that are flags, in order."""
    return (f for f in fields(cls) if "flag" in f.metadata)


def dest(f: Field) -> str:
    """The argparse destination of a field's flag (``--hid-sz`` -> ``hid_sz``)."""
    return f.metadata["flag"][2:].replace("-", "_")


def all_flag_fields() -> Iterator[Tuple[str, Field]]:
    """(section name, field) of every flag, sections in the order of SECTIONS."""
    for name, cls in SECTIONS:
        for f in flag_fields(cls):
            yield name, f


@dataclass
class Settings:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    run: RunConfig

    @classmethod
    def from_args(cls, args, vocab_size: int = 0) -> "Settings":
        """From an argparse namespace of flags.build_parser (or a parser with its flags)."""
        parts = {name: section(**{f.name: copy.copy(getattr(args, dest(f))) for f in flag_fields(section)})
                 for name, section in SECTIONS}
        parts["model"].vocab_size = vocab_size
        parts["data"].sort_by_freq = parts["model"].adapt_io
        return cls(**parts)

    def sections(self):
        return ((name, getattr(self, name)) for name, _ in SECTIONS)

    def check_ranges(self) -> None:
        """Each flag on its own (its field's rule), before any file is read."""
        for _, section in self.sections():
            for f in flag_fields(type(section)):
                if f.metadata["rule"] is not None:
                    f.metadata["rule"].check(f.metadata["flag"], getattr(section, f.name))

    def stored(self, data_is_file: bool) -> dict:
        """The checkpoint's ``config`` entry: model and train whole (the model's vocabulary
        size included), the data's path, unit and split (None for a folder, which has its
        own split)."""
        data = {f.name: copy.copy(getattr(self.data, f.name))
                for f in flag_fields(DataConfig) if f.metadata["stored"]}
        if not data_is_file:
            data["split"] = None
        return {"model": asdict(self.model), "train": asdict(self.train), "data": data}

    def merge_saved(self, saved: dict, explicit: set, source: str) -> None:
        """Take a checkpoint's configuration: every stored setting the command line did not
        give. A given one that differs is an error unless its field may change on resume.
        Settings the checkpoint lacks (older checkpoints) keep the command line's value."""
        for name in STORED:
            section, values = getattr(self, name), saved.get(name) or {}
            for f in flag_fields(type(section)):
                value = values.get(f.name)
                if not f.metadata["stored"] or value is None:
                    continue
                if dest(f) not in explicit:
                    setattr(section, f.name, copy.copy(value))
                elif not f.metadata["may_change"] and not same(getattr(section, f.name), value):
                    raise ConfigError(contradiction(f.metadata["flag"], getattr(section, f.name), value, source))
        self.data.sort_by_freq = self.model.adapt_io


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def contradiction(flag: str, given, value, source: str) -> str:
    if isinstance(given, bool):
        return (f"{flag} contradicts the checkpoint {source}, which was trained without it; drop the "
                "flag or use another checkpoint")
    return (f"{flag} {show(given)} contradicts the checkpoint {source}, which was trained with {flag} "
            f"{show(value)}; drop the flag or use another checkpoint")
