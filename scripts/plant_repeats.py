"""Make a long-range corpus: any text with copies of earlier passages planted into it.

    python scripts/plant_repeats.py SOURCE OUT [--max-distance 4096] [--min-distance 64]
        [--copy-len 32 128] [--copy-fraction 0.2] [--test-size 200000] [--seed 1]

SOURCE is a text file (read as bytes) or a zip archive with one member (e.g. enwik8.zip).
It is split like scripts/get_data.sh splits enwik8 (valid and test of --test-size bytes
each, taken from the end), copies are planted into every split (planted.py says how), and
OUT is written in the enwik8 on-disk format (train.txt, valid.txt, test.txt, *.txt.raw),
with the side file copies.json listing every copy as [start, length, distance] in token
positions of each split, and .prepared.json (source, sha256, settings). Train on OUT with
``python main.py --data OUT``; score copied and ordinary positions apart with
``python scripts/score_copies.py --checkpoint CKPT``. The same seed gives the same files.
"""
import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import planted  # noqa: E402
from utils import ConfigError  # noqa: E402

PROG = "plant_repeats.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a text file, or a zip archive with one member")
    p.add_argument("out", type=Path, help="the folder to write (must not exist, or be empty)")
    d = planted.PlantConfig()
    p.add_argument("--max-distance", type=int, default=d.max_distance, metavar="D",
                   help="longest copy distance in tokens (distances are log-uniform over [min, D])")
    p.add_argument("--min-distance", type=int, default=d.min_distance, help="shortest copy distance")
    p.add_argument("--copy-len", type=int, nargs=2, default=[d.min_len, d.max_len], metavar=("MIN", "MAX"),
                   help="length of each copied passage in tokens, uniform in [MIN, MAX]")
    p.add_argument("--copy-fraction", type=float, default=d.fraction,
                   help="fraction of the output tokens that are copies")
    p.add_argument("--test-size", type=int, default=200_000,
                   help="bytes of the source for valid and for test each, from the end (before planting)")
    p.add_argument("--seed", type=int, default=d.seed, help="the same seed gives the same corpus")
    return p


def read_source(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give a text file or a zip archive with one member")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) != 1:
                raise ConfigError(f"{path}: the archive holds {len(members)} files; give one with a "
                                  f"single member (e.g. enwik8.zip) or the text itself")
            return zf.read(members[0])
    return path.read_bytes()


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; delete it or choose another OUT")
    if not out.parent.exists():
        raise ConfigError(f"{out.parent}: no such folder; create it first or choose another OUT")


def make(args) -> None:
    cfg = planted.PlantConfig(min_distance=args.min_distance, max_distance=args.max_distance,
                              min_len=args.copy_len[0], max_len=args.copy_len[1],
                              fraction=args.copy_fraction, seed=args.seed)
    cfg.check()
    check_out(args.out)
    data = read_source(args.source)
    splits, runs = planted.plant_splits(data, args.test_size, cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.partial-", dir=args.out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        planted.write_folder(splits, runs, tmp, planted.marker_info(args.source, data, args.test_size, cfg))
        if args.out.exists():
            args.out.rmdir()
        os.rename(tmp, args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for name in planted.SPLITS:
        copied = sum(r[1] for r in runs[name])
        print(f"  {name}.txt: {len(splits[name]):,} tokens, {len(runs[name]):,} copies, "
              f"{copied:,} copied tokens ({copied / max(1, len(splits[name])):.1%})")
    print(f"planted corpus -> {args.out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        make(args)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
