"""Test data: English-like text from a seeded generator, in every form the project reads
(a byte-level text file, enwik8- and text8-style archives, WikiText-style word text), and
the reference fixtures of ../shared/data/fixtures when they are present.

The generator draws words from a Zipf distribution over a fixed list of common English
words followed by pronounceable made-up words, and builds capitalised sentences with
commas and full stops, grouped into paragraphs. The same seed gives the same bytes on
every machine (only ``random.Random`` is used).
"""
import random
import shutil
import zipfile
from itertools import accumulate
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "data" / "fixtures"

COMMON = ("the of and to a in is that it was for on as with he be by at his this from had not are "
          "but or which have an they you were her one all she there would their we him been has when "
          "who will more no if out so said what up its about into than them can only other new some "
          "time could these two may then do first any my now such like our over man me even most made "
          "after also did many before must through back years where much your way well down should "
          "because each just those people how too little state good very make world still own see men "
          "work long get here between both life being under never day same another know while last "
          "might us great old year off come since against go came right used take three").split()
ONSETS = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "cr",
          "dr", "gr", "pl", "pr", "sh", "st", "th", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo"]
CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "rk", "m"]


def vocabulary(size: int, seed: int = 0) -> list:
    """The COMMON words, then distinct made-up words of one to three syllables."""
    rng = random.Random(seed)
    words, seen = list(COMMON), set(COMMON)
    while len(words) < size:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(rng.choice((1, 2, 2, 3))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words[:size]


def word_stream(n: int, vocab_size: int = 3000, seed: int = 0) -> list:
    """n words drawn with Zipf weights 1/rank."""
    rng = random.Random(seed)
    words = vocabulary(vocab_size, seed)
    weights = list(accumulate(1.0 / rank for rank in range(1, len(words) + 1)))
    return rng.choices(words, cum_weights=weights, k=n)


def sentences(words: list, seed: int = 0):
    """Capitalised sentences of 4 to 20 words, with a comma now and then."""
    rng, i = random.Random(seed + 1), 0
    while i < len(words):
        n = rng.randint(4, 20)
        part = words[i:i + n]
        i += n
        if len(part) > 6 and rng.random() < 0.5:
            cut = rng.randint(2, len(part) - 3)
            part[cut] += ","
        part[0] = part[0].capitalize()
        yield " ".join(part) + rng.choice(".....?!")


def english(nbytes: int, seed: int = 0) -> bytes:
    """Exactly ``nbytes`` of English-like text: paragraphs of sentences, one per line."""
    rng = random.Random(seed + 2)
    words = word_stream(nbytes // 5 + 100, seed=seed)
    lines, line, size = [], [], 0
    for sentence in sentences(words, seed):
        line.append(sentence)
        if rng.random() < 0.25:
            lines.append(" ".join(line))
            size += len(lines[-1]) + 1
            line = []
        if size >= nbytes:
            break
    text = "\n".join(lines).encode()
    assert len(text) >= nbytes, "generator too short"
    return text[:nbytes]


def wiki_markup(nbytes: int, seed: int = 0) -> bytes:
    """``nbytes`` of enwik8-like text: pages of English-like paragraphs in XML, with links,
    headings and some non-ASCII characters (so every UTF-8 byte length occurs)."""
    rng = random.Random(seed + 3)
    body = english(nbytes, seed).decode().split("\n")
    out = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/" xml:lang="en">']
    for i, para in enumerate(body):
        if i % 8 == 0:
            if i:
                out.append("</text>\n  </page>")
            title = " ".join(para.split()[:2]).strip(",.?!")
            out.append(f"  <page>\n    <title>{title}</title>\n    <id>{i}</id>\n    <text xml:space=\"preserve\">")
        words = para.split(" ")
        for _ in range(2):
            j = rng.randrange(len(words))
            words[j] = f"[[{words[j]}]]"
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(["café", "naïve", "— ", "€5", "日本"]))
        if rng.random() < 0.15:
            out.append(f"== {' '.join(words[:3])} ==")
        out.append(" ".join(words))
    return "\n".join(out).encode()[:nbytes]


def text8_like(nchars: int, seed: int = 0) -> bytes:
    """``nchars`` of text8-style text: lowercase a-z words separated by single spaces."""
    return " ".join(word_stream(nchars // 5 + 100, seed=seed)).encode()[:nchars]


def wikitext_lines(nlines: int, vocab_size: int = 12000, seed: int = 0) -> list:
    """WikiText-style lines: ' = Title = ' headings, blank lines, and tokenised paragraphs
    (punctuation as separate tokens, ' @-@ ' for a hyphen)."""
    rng = random.Random(seed + 4)
    words = iter(word_stream(nlines * 40, vocab_size, seed))
    lines = []
    while len(lines) < nlines:
        if rng.random() < 0.1:
            lines += ["", f" = {next(words).capitalize()} {next(words)} = ", ""]
            continue
        tokens = []
        for _ in range(rng.randint(1, 4)):
            sentence = [next(words) for _ in range(rng.randint(4, 18))]
            sentence[0] = sentence[0].capitalize()
            if rng.random() < 0.2:
                sentence.insert(rng.randrange(1, len(sentence)), "@-@")
            if rng.random() < 0.4:
                sentence.insert(rng.randrange(1, len(sentence)), ",")
            tokens += sentence + ["."]
        lines.append(" " + " ".join(tokens) + " ")
    return lines[:nlines]


def write_zip(path: Path, members: dict) -> Path:
    """A zip archive holding ``members`` (name -> bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def fixture_folder(name: str) -> Path:
    """A reference fixture folder (read-only), or a skip naming the folder it needs."""
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"needs the reference fixtures: {folder} is absent")
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    """A writable copy of the files of ``src`` (the shared folders are read-only)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copyfile(path, dst / path.name)
    return dst


def reference_enwik8(part: bytes) -> bytes:
    """The reference's enwik8 on-disk format, written plainly: every byte as its decimal
    value, separated by single spaces; a newline byte is a real line break."""
    return " ".join(str(c) if c != 10 else "\n" for c in part).encode()


def reference_text8(part: bytes) -> bytes:
    """The reference's text8 format: stripped, every character separated by a space, '_'
    for a space, one line."""
    return " ".join("_" if c == " " else c for c in part.decode().strip()).encode()


def write_reference_folder(folder: Path, data: bytes, n: int, style: str = "enwik8") -> Path:
    """A reference-format folder: {train,valid,test}.txt of data[:-2n], data[-2n:-n], data[-n:]."""
    fmt = reference_enwik8 if style == "enwik8" else reference_text8
    folder.mkdir(parents=True)
    for name, part in (("train", data[:-2 * n]), ("valid", data[-2 * n:-n]), ("test", data[-n:])):
        (folder / f"{name}.txt").write_bytes(fmt(part))
    return folder
