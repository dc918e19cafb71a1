r"""Sample text from a trained model, streamed to stdout one token at a time.

    python scripts/generate.py --checkpoint run.pt --prompt "the meaning of" --length 200 \
        [--temperature 1.0] [--top-k 0] [--seed 1111] [--num-samples 1] [--no-kv-cache]
    # a reference checkpoint also needs its data (for the vocabulary) and model flags:
    python scripts/generate.py --checkpoint ref.pt --data data/text8 --nlayers 12 --hid-sz 512 ... \
        --prompt "..."

Dimension legend: B batch (the samples), M block length, L max span, H hidden,
V vocabulary.

The prompt is fed in blocks of the training block size (the model's forward, caches
starting as zeros like the training streams), then each new token costs one position.
By default (inference.KVCache) every layer keeps the projected keys and values of the
positions each head can see (its window), so a token costs the projections of one
position plus O(window x head dim) per head. ``--no-kv-cache`` keeps the full
recomputation instead: ``model(x, caches)`` carries hidden states and re-projects the
keys and values of every cached position at every token (same log-probabilities up to
float rounding: 1e-5 in float32, see docs/evaluation.md). ``--num-samples N`` draws N continuations of the prompt in
one batch (the prompt is run once); with N = 1 the sample is streamed, with N > 1 the
samples are printed one after another, each after a ``=== sample i/N ===`` line. The
prompt and the samples are printed decoded (bytes, enwik8 bytes, text8 characters with
``_`` as a space, or words); the speed goes to stderr. Model flags are those of main.py.
"""
import argparse
import codecs
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint as ckpt_io  # noqa: E402
import corpus_cache  # noqa: E402
import flags  # noqa: E402
from build import build_model  # noqa: E402
from checks import check_flags  # noqa: E402
from data import EOS, DataConfig, Vocab, load_corpus, split_sizes  # noqa: E402
from inference import KVCache  # noqa: E402
from models import TransformerSeq  # noqa: E402
from settings import Settings  # noqa: E402
from train_state import load_model_state  # noqa: E402
from threads import apply_threads, local_world_size  # noqa: E402
from utils import ConfigError  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter,
                                usage="python scripts/generate.py --checkpoint PATH [flags]")
    own = p.add_argument_group("generation")
    own.add_argument("--checkpoint", default="", help="the model: our checkpoint, or a reference one with its flags")
    own.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: start after an <eos>)")
    own.add_argument("--length", type=int, default=200, help="tokens to generate")
    own.add_argument("--num-samples", type=int, default=1,
                     help="continuations of the prompt drawn in one batch (N > 1: printed one after another)")
    own.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    own.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    own.add_argument("--seed", type=int, default=1111, help="random seed of the sampling")
    own.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                     help="recompute the keys and values of the whole cache at every token instead of "
                          "keeping them (slower; to check the key/value cache against) (default: off, "
                          "the key/value cache is used)")
    own.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    own.add_argument("--threads", type=int, default=0,
                     help="CPU threads (default: 0, chosen by threads.py: $OMP_NUM_THREADS where set, "
                          "else the cores of this process that other processes leave free)")
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


def start_kv_cache(model: TransformerSeq, prompt: List[int], block: int, n: int):
    """The prompt through a key/value cache of ``n`` streams: the log-probabilities
    (n, V) after it, and a step ``tokens (n ints) -> log-probabilities (n, V)``."""
    device = model.key_pe.device
    cache = KVCache(model)
    log_probs = cache.prefill(torch.tensor([prompt], device=device), block, n)  # (1, P, V)
    return log_probs[0, -1].expand(n, -1), lambda tokens: cache.step(torch.tensor(tokens, device=device))


def start_recompute(model: TransformerSeq, prompt: List[int], block: int, n: int):
    """As ``start_kv_cache``, with the model's hidden-state caches (every token
    re-projects the keys and values of the whole cache)."""
    device = model.key_pe.device
    log_probs, caches = feed(model, prompt, model.init_cache(1, device), block)  # (P, V)
    state = [c.repeat(n, 1, 1) for c in caches]  # (n, C, H) each

    @torch.no_grad()
    def step(tokens: List[int]) -> torch.Tensor:
        x = torch.tensor(tokens, dtype=torch.long, device=device).view(n, 1)  # (n, 1)
        out, state[:] = model(x, state)  # (n, 1, V)
        return out[:, -1]  # (n, V)

    return log_probs[-1].expand(n, -1), step


def generate_batch(model: TransformerSeq, prompt: List[int], length: int, block: int,
                   temperature: float, top_k: int, seed: int, num_samples: int = 1,
                   kv_cache: bool = True) -> Iterator[List[int]]:
    """Yield ``length`` steps of ``num_samples`` sampled tokens after ``prompt`` (at
    least one token); the samples are drawn in order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    # dynamic spans change with every position: no fixed windows to keep keys and values for
    use_cache = kv_cache and not model.cfg.adapt_span_dynamic
    start = start_kv_cache if use_cache else start_recompute
    last, step = start(model, prompt, block, num_samples)  # (N, V)
    for n in range(length):
        tokens = [sample(row, temperature, top_k, generator) for row in last]
        yield tokens
        if n + 1 < length:
            last = step(tokens)  # (N, V)


def generate(model: TransformerSeq, prompt: List[int], length: int, block: int, temperature: float,
             top_k: int, seed: int, kv_cache: bool = True) -> Iterator[int]:
    """Yield ``length`` sampled tokens after ``prompt`` (at least one token)."""
    for tokens in generate_batch(model, prompt, length, block, temperature, top_k, seed, 1, kv_cache):
        yield tokens[0]


# ---- loading -------------------------------------------------------------------------
def trained_ids(ckpt: dict, vocab: Vocab) -> Optional[set]:
    """Ids of the tokens that occur in the training text, where the vocabulary does not
    say: a text file read as bytes has all 256 bytes in its vocabulary. From the
    checkpoint's ``vocab['seen']`` where it holds it, else from the training file at
    the recorded path while its fingerprint is unchanged; None where neither is at hand
    (then nothing is checked) and for the other vocabularies (built from the text)."""
    if vocab.style != "bytes":
        return None
    if ckpt["vocab"].get("seen") is not None:
        return set(ckpt["vocab"]["seen"])
    data = ckpt.get("config", {}).get("data", {})
    path = Path(data.get("path") or "")
    if not path.is_file() or corpus_cache.fingerprint([path]) != data.get("fingerprint"):
        return None
    raw = np.fromfile(path, dtype=np.uint8)  # (N,)
    n_train = split_sizes(len(raw), data.get("split") or DataConfig("").split)[0]
    return set(np.unique(raw[:n_train]).tolist())


def load(args, explicit: set) -> Tuple[TransformerSeq, Vocab, int, Optional[set]]:
    """The model in eval mode, its vocabulary, block size and ``trained_ids``."""
    if not args.checkpoint:
        raise ConfigError("--checkpoint PATH is required")
    ckpt = ckpt_io.require_checkpoint(args.checkpoint, log=lambda msg: print(msg, file=sys.stderr))
    settings = Settings.from_args(args)
    seen = None
    if ckpt_io.is_reference(ckpt):
        if "data" not in explicit:
            raise ConfigError("a reference checkpoint carries no vocabulary: give --data DIR (its "
                              "training data) and the model flags it was trained with")
        vocab = load_corpus(DataConfig(settings.data.path, sort_by_freq=settings.model.adapt_io)).vocab
    else:
        settings.merge_saved(ckpt["config"], explicit, args.checkpoint)
        vocab = Vocab(ckpt["vocab"]["idx2word"], ckpt["vocab"]["style"])
        seen = trained_ids(ckpt, vocab)
    check_flags(settings)
    model, _ = build_model(settings, len(vocab), "cpu")
    load_model_state(model, ckpt, args.checkpoint)
    return model.eval(), vocab, settings.train.block_size, seen


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


UNIT = {"bytes": "bytes", "enwik8": "bytes", "chars": "characters", "words": "words"}


def shown_tokens(vocab: Vocab, prompt: str, bad: set, most: int = 10) -> str:
    """The prompt's characters (byte vocabularies: those holding a byte of ``bad``) or
    words in ``bad``, in order, once each, at most ``most`` of them."""
    if vocab.style in ("bytes", "enwik8"):
        items = [c for c in dict.fromkeys(prompt) if set(vocab.words(c)) & bad]
    else:
        items = [w for w in dict.fromkeys(vocab.words(prompt)) if w in bad]
    text = " ".join(repr(" " if w == "_" and vocab.style == "chars" else w) for w in items[:most])
    return text + (f" and {len(items) - most} more" if len(items) > most else "")


def prompt_ids(vocab: Vocab, prompt: str, seen: Optional[set] = None) -> List[int]:
    """The prompt's token ids. Tokens outside the vocabulary are left out (``<unk>``
    where the vocabulary has one), and with those the training text never holds
    (``seen``, see trained_ids) named on one ``warning:`` line on stderr."""
    if prompt:
        index = {w: i for i, w in enumerate(vocab.idx2word)}
        words = vocab.words(prompt)
        outside = {w for w in words if w not in index}
        unseen = {w for w in words if seen is not None and w in index and index[w] not in seen}
        problems = []
        for bad, what in ((outside, "not in the vocabulary, " + ("given as <unk>" if "<unk>" in index
                                                                  else "left out")),
                          (unseen, "never in the training text: the model has not learned them")):
            count = sum(w in bad for w in words)
            if count:
                problems.append(f"{count} of its {len(words)} {UNIT[vocab.style]} ({shown_tokens(vocab, prompt, bad)}) "
                                f"are {what}")
        if problems:
            print(f"warning: --prompt: {'; '.join(problems)}", file=sys.stderr)
        ids = [index.get(w, index.get("<unk>")) for w in words]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ConfigError("--prompt: none of its tokens is in the model's vocabulary; give a prompt "
                              "in the language of the training text")
        return ids
    if EOS not in vocab.idx2word:
        raise ConfigError("this vocabulary has no <eos> to start from; give --prompt TEXT")
    return [vocab.idx2word.index(EOS)]


def report_speed(prompt_len: int, steps: int, samples: int, start: float, first: float,
                 end: float, threads: str = "") -> None:
    """The prompt time, the sampling rate and the threads used, on stderr."""
    rate = (steps - 1) / (end - first) if steps > 1 else float("nan")
    if samples == 1:
        done = f"{steps - 1} tokens in {end - first:.2f} s ({rate:.1f} tokens/s)"
    else:
        done = (f"{steps - 1} steps of {samples} samples in {end - first:.2f} s ({rate:.1f} steps/s, "
                f"{rate * samples:.1f} tokens/s)")
    print(f"prompt of {prompt_len} tokens and first token: {first - start:.3f} s; then {done}"
          f"{'; ' + threads if threads else ''}", file=sys.stderr)


def write_samples(args, model: TransformerSeq, vocab: Vocab, ids: List[int], block: int,
                  threads: str = "") -> None:
    """Sample and print: streamed for one sample, else the samples one after another."""
    n = args.num_samples
    decoder = StreamDecoder(vocab)
    if args.prompt and n == 1:
        sys.stdout.write(decoder.feed(ids))
        sys.stdout.flush()
    start, first, steps, rows = time.perf_counter(), None, 0, [[] for _ in range(n)]
    # a progress bar on stderr only when the text goes elsewhere (a file, a pipe) or is
    # printed at the end: on one terminal the bar would garble the streamed text
    bar = tqdm(total=args.length, unit="tok", disable=True if n == 1 and sys.stdout.isatty() else None)
    for tokens in generate_batch(model, ids, args.length, block, args.temperature, args.top_k,
                                 args.seed, n, args.kv_cache):
        if n == 1:
            sys.stdout.write(decoder.feed(tokens))
            sys.stdout.flush()
        for row, token in zip(rows, tokens):
            row.append(token)
        steps += 1
        bar.update(1)
        first = first or time.perf_counter()
    bar.close()
    end = time.perf_counter()
    if n == 1:
        sys.stdout.write(decoder.flush() + "\n")
    for i, row in enumerate(rows if n > 1 else []):
        decoder = StreamDecoder(vocab)
        text = (decoder.feed(ids) if args.prompt else "") + decoder.feed(row) + decoder.flush()
        sys.stdout.write(f"=== sample {i + 1}/{n} ===\n{text}\n")
    sys.stdout.flush()
    if steps:
        report_speed(len(ids), steps, n, start, first, end, threads)


def run(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.length < 0 or args.top_k < 0:
        raise ConfigError("--length and --top-k must not be negative")
    if args.num_samples < 1:
        raise ConfigError("--num-samples must be at least 1")
    threads = apply_threads(args.threads, local_world_size())
    model, vocab, block, seen = load(args, flags.explicit_flags(argv))
    model.to(pick_device(args.device))
    write_samples(args, model, vocab, prompt_ids(vocab, args.prompt, seen), block, threads)
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
