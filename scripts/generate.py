"""Sample text from a trained model, streamed to stdout one token at a time.

    python scripts/generate.py --checkpoint run.pt --prompt "the meaning of" --length 200 \
        [--temperature 1.0] [--top-k 0] [--seed 1111]
    # a reference checkpoint also needs its data (for the vocabulary) and model flags:
    python scripts/generate.py --checkpoint ref.pt --data data/text8 --nlayers 12 --hid-sz 512 ... \
        --prompt "..."

Dimension legend: B batch (1), M block length, L max span, H hidden, V vocabulary.

The prompt is fed in blocks of the training block size, then each new token costs
one forward of one position: every layer's cache of hidden states is carried over
(``model(x, caches)`` returns log-probabilities (B, M, V) and the next caches), and
each head attends only within its learned span (the model's attention trims it).
Like the training streams, the caches start as zeros. The prompt and the sample
are printed decoded (bytes, enwik8 bytes, text8 characters with ``_`` as a space,
or words); the speed goes to stderr. Model flags are those of main.py.
"""
import argparse
import codecs
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint as ckpt_io  # noqa: E402
import flags  # noqa: E402
import main as entry  # noqa: E402
from data import EOS, DataConfig, Vocab, load_corpus  # noqa: E402
from models import TransformerSeq  # noqa: E402
from utils import ConfigError  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter,
                                usage="python scripts/generate.py --checkpoint PATH [flags]")
    own = p.add_argument_group("generation")
    own.add_argument("--checkpoint", default="", help="the model: our checkpoint, or a reference one with its flags")
    own.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: start after an <eos>)")
    own.add_argument("--length", type=int, default=200, help="tokens to generate")
    own.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    own.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    own.add_argument("--seed", type=int, default=1111, help="random seed of the sampling")
    own.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    own.add_argument("--threads", type=int, default=1,
                     help="CPU threads (one-token steps are too small to gain from more; 0: torch's default)")
    title = "model (main.py's flags; only for a reference checkpoint: ours carry their configuration)"
    flags.add_flag_groups(p, ("data",) + flags.MODEL_GROUPS, title=title)
    flags.add_flag_groups(p, hidden=True)  # the training flags: parsed, not listed
    return p


# ---- decoding ---------------------------------------------------------------------
class StreamDecoder:
    """Turns token ids into text incrementally, as ``Vocab.decode`` would: bytes are
    decoded as UTF-8 across token boundaries; words are joined by spaces and
    ``<eos>`` is a line break."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.line_start = True

    def feed(self, ids: List[int]) -> str:
        words = [self.vocab.idx2word[i] for i in ids]
        style = self.vocab.style
        if style in ("bytes", "enwik8"):
            return self.utf8.decode(bytes(10 if w == EOS else int(w) for w in words))
        if style == "chars":
            return "".join("\n" if w == EOS else (" " if w == "_" else w) for w in words)
        out = []
        for w in words:
            if w == EOS:
                out.append("\n")
                self.line_start = True
            else:
                out.append(w if self.line_start else " " + w)
                self.line_start = False
        return "".join(out)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True) if self.vocab.style in ("bytes", "enwik8") else ""


# ---- sampling ----------------------------------------------------------------------
def sample(log_probs: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One token from log-probabilities (V,): greedy at temperature 0, else softmax of
    log_probs / T restricted to the ``top_k`` likeliest (0: all)."""
    log_probs = log_probs.detach().float().cpu()  # (V,)
    if temperature <= 0:
        return int(log_probs.argmax())
    logits = log_probs / temperature  # (V,)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (V,)
    probs = torch.softmax(logits, dim=-1)  # (V,)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def feed(model: TransformerSeq, ids: List[int], caches: List[torch.Tensor], block: int):
    """Run ``ids`` through the model in blocks of ``block``, carrying the caches.
    Returns the log-probabilities (len(ids), V) and the next caches."""
    device = caches[0].device
    out = []
    for start in range(0, len(ids), block):
        x = torch.tensor([ids[start:start + block]], dtype=torch.long, device=device)  # (1, m)
        log_probs, caches = model(x, caches)  # (1, m, V)
        out.append(log_probs[0])
    return torch.cat(out), caches  # (len(ids), V)


def generate(model: TransformerSeq, prompt: List[int], length: int, block: int, temperature: float,
             top_k: int, seed: int) -> Iterator[int]:
    """Yield ``length`` sampled tokens after ``prompt`` (at least one token)."""
    generator = torch.Generator().manual_seed(seed)
    caches = model.init_cache(1, model.key_pe.device)
    log_probs, caches = feed(model, prompt, caches, block)
    last = log_probs[-1]  # (V,)
    for n in range(length):
        token = sample(last, temperature, top_k, generator)
        yield token
        if n + 1 < length:
            log_probs, caches = feed(model, [token], caches, 1)
            last = log_probs[-1]  # (V,)


# ---- loading -------------------------------------------------------------------------
def load(args, explicit: set) -> Tuple[TransformerSeq, Vocab, int]:
    """The model in eval mode, its vocabulary and block size."""
    if not args.checkpoint:
        raise ConfigError("--checkpoint PATH is required")
    ckpt = ckpt_io.require_checkpoint(args.checkpoint, log=lambda msg: print(msg, file=sys.stderr))
    if ckpt_io.is_reference(ckpt):
        if "data" not in explicit:
            raise ConfigError("a reference checkpoint carries no vocabulary: give --data DIR (its "
                              "training data) and the model flags it was trained with")
        vocab = load_corpus(DataConfig(args.data, sort_by_freq=args.adapt_io)).vocab
    else:
        entry.merge_saved_config(args, explicit, ckpt["config"])
        vocab = Vocab(**ckpt["vocab"])
    entry.check_flags(args)
    model, _, _ = entry.build_model(args, len(vocab), "cpu")
    ckpt_io.load_model_state(model, ckpt, args.checkpoint)
    return model.eval(), vocab, args.block_sz


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def prompt_ids(vocab: Vocab, prompt: str) -> List[int]:
    if prompt:
        return vocab.encode(prompt)
    if EOS not in vocab.idx2word:
        raise ConfigError("this vocabulary has no <eos> to start from; give --prompt TEXT")
    return [vocab.idx2word.index(EOS)]


def run(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.length < 0 or args.top_k < 0:
        raise ConfigError("--length and --top-k must not be negative")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, vocab, block = load(args, entry.explicit_flags(parser, argv))
    model.to(pick_device(args.device))
    ids = prompt_ids(vocab, args.prompt)
    decoder = StreamDecoder(vocab)
    if args.prompt:
        sys.stdout.write(decoder.feed(ids))
        sys.stdout.flush()
    start, first, count = time.perf_counter(), None, 0
    # a progress bar on stderr only when the text goes elsewhere (a file, a pipe): on one
    # terminal the bar would garble the streamed text
    bar = tqdm(total=args.length, unit="tok", disable=True if sys.stdout.isatty() else None)
    for token in generate(model, ids, args.length, block, args.temperature, args.top_k, args.seed):
        sys.stdout.write(decoder.feed([token]))
        sys.stdout.flush()
        count += 1
        bar.update(1)
        first = first or time.perf_counter()
    bar.close()
    end = time.perf_counter()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    if count:
        rate = (count - 1) / (end - first) if count > 1 else float("nan")
        print(f"prompt of {len(ids)} tokens and first token: {first - start:.3f} s; then {count - 1} "
              f"tokens in {end - first:.2f} s ({rate:.1f} tokens/s)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenPipeError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
