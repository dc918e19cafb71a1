"""bpc of a checkpoint on the copied and the ordinary positions of a planted corpus apart.

    python scripts/score_copies.py --checkpoint CKPT [--data DIR] [--split valid]
        [--batch-sz 8] [--tokens N] [--cache-dir DIR]

The data is the checkpoint's (``--data`` when it moved): a folder made by
scripts/plant_repeats.py, whose copies.json says which positions are copies. The split is
scored like ``main.py --full-eval-mode`` (``--batch-sz`` streams, each from an empty cache,
blocks of the training block size, every token after the first), and the per-token NLL is
grouped by the side file (copy_score.py): ordinary positions, copied positions whose
source lies in the same stream, copied positions whose source lies before the stream's
start (no span can reach it), and copied positions per distance octave. ``--tokens N``
scores only the first N tokens of the split.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint as ckpt_io  # noqa: E402
import copy_score  # noqa: E402
import planted  # noqa: E402
from data import DataConfig, data_fingerprint, load_corpus  # noqa: E402
from models import ModelConfig, TransformerSeq  # noqa: E402
from train_state import load_model_state  # noqa: E402
from utils import ConfigError  # noqa: E402

PROG = "score_copies.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of main.py trained on a planted corpus")
    p.add_argument("--data", default="", help="the planted folder (default: the checkpoint's)")
    p.add_argument("--split", choices=planted.SPLITS, default="valid")
    p.add_argument("--batch-sz", type=int, default=8, help="streams the split is cut into")
    p.add_argument("--tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--cache-dir", default=None, help="token cache folder (main.py's --cache-dir)")
    return p


def load(args):
    ckpt = ckpt_io.require_checkpoint(args.checkpoint, log=lambda msg: print(msg, file=sys.stderr))
    if ckpt_io.is_reference(ckpt):
        raise ConfigError(f"--checkpoint {args.checkpoint}: a reference checkpoint has no data of its "
                          f"own; score a checkpoint of main.py trained on a planted corpus")
    data = args.data or ckpt["config"]["data"]["path"]
    side = planted.read_side_file(Path(data))
    cfg = DataConfig(data, cache_dir=args.cache_dir)
    if data_fingerprint(cfg) != ckpt["config"]["data"]["fingerprint"]:
        raise ConfigError(f"--data {data} is not the data {args.checkpoint} was trained on "
                          f"({ckpt['config']['data']['path']}); give that folder")
    if args.batch_sz < 1 or args.tokens < 0:
        raise ConfigError("--batch-sz must be at least 1 and --tokens at least 0")
    model = TransformerSeq(ModelConfig(**ckpt["config"]["model"]))
    load_model_state(model, ckpt, args.checkpoint)
    return model, load_corpus(cfg), side, ckpt["config"]["train"]["block_size"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, corpus, side, block = load(args)
        ids = corpus.split(args.split)
        dist = planted.copy_distances(side[args.split], len(ids))
        if args.tokens:
            ids, dist = ids[:args.tokens], dist[:args.tokens]
        if len(ids) < args.batch_sz + 1:
            raise ConfigError(f"--tokens {len(ids)} is too few for --batch-sz {args.batch_sz}")
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    nll, row_start = copy_score.token_nll(model, ids, args.batch_sz, block)
    for name, figures in copy_score.score(nll, dist, row_start).items():
        print(f"{args.split} {name}: {figures['bpc']:.4f}bpc tokens: {figures['tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
