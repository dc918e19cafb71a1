"""Download enwik8, text8 and WikiText-103 and write them in the reference on-disk format.

Called by ``scripts/get_data.sh`` (run ``bash scripts/get_data.sh --help`` for the usage).

Formats written (``n`` = --test-size, default 5,000,000; train = data[:-2n], valid =
data[-2n:-n], test = data[-n:]):
  enwik8        every byte as its decimal value, tokens joined by one space; a newline byte
                (10) is written as a real line break that is itself a token ("... 62 \\n 32 ...").
                No final newline. ``*.txt.raw`` hold the raw bytes of each split.
  text8         ``part.strip()``, every character followed by one space except the last,
                '_' for a space: a single line, no final newline.
  wikitext-103  wiki.{train,valid,test}.tokens copied to {train,valid,test}.txt unchanged.

A folder is written under a hidden temporary name next to the target and renamed when
complete; the marker file ``.prepared.json`` is written last, so a folder without it was
not finished (or was made by another tool).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

PROG = "get_data.sh"
MARKER = ".prepared.json"
SPLITS = ("train", "valid", "test")
CHUNK = 1 << 22  # bytes copied per step


@dataclass(frozen=True)
class Spec:
    urls: List[str]  # tried in order
    archive: str  # file name of the downloaded archive
    member: str  # zip member (basename) holding the data; '' for wikitext
    full_size: int  # bytes of the member in the official archive; 0 if unknown


SPECS = {
    "enwik8": Spec(["http://mattmahoney.net/dc/enwik8.zip"], "enwik8.zip", "enwik8", 100_000_000),
    "text8": Spec(["http://mattmahoney.net/dc/text8.zip"], "text8.zip", "text8", 100_000_000),
    "wikitext-103": Spec(["https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
                          "https://wikitext.smerity.com/wikitext-103-v1.zip"],  # the authors' current mirror
                         "wikitext-103-v1.zip", "", 0),
}


class PrepError(Exception):
    """A failure reported to the user as one line, without a traceback."""


class ArchiveError(PrepError):
    """A failed download or a bad archive: the message adds how to do it by hand."""


def progress(total: int, desc: str):
    if tqdm is None:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                disable=None, file=sys.stderr)


# --------------------------------------------------------------------------- conversion
def write_tokens(part: np.ndarray, path: Path, kind: str) -> None:
    """Write ``part`` in the dataset's token format (reference_format.py, the library module
    beside scripts/, imported where it is used), with a progress bar."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import reference_format
    bar = progress(len(part), path.name)
    reference_format.write_tokens(part, path, kind, on_chunk=None if bar is None else bar.update)
    if bar is not None:
        bar.close()


def split_bounds(total: int, test_size: int):
    if test_size <= 0 or 2 * test_size >= total:
        raise PrepError(f"--test-size {test_size} does not fit a text of {total:,} bytes "
                        f"(need 0 < 2 x test-size < size)")
    return [(0, total - 2 * test_size), (total - 2 * test_size, total - test_size),
            (total - test_size, total)]


def prepare_chars(data: bytes, out: Path, kind: str, test_size: int) -> None:
    """enwik8 / text8: split by bytes (characters) and write every split."""
    array = np.frombuffer(data, dtype=np.uint8)  # (T,)
    if kind == "text8" and (array >= 128).any():
        raise PrepError("the text8 member holds non-ASCII bytes; it is not text8")
    for name, (lo, hi) in zip(SPLITS, split_bounds(len(array), test_size)):
        part = array[lo:hi]  # (n,)
        if kind == "text8":
            part = np.frombuffer(data[lo:hi].strip(), dtype=np.uint8)  # (<= n,)
        else:
            (out / f"{name}.txt.raw").write_bytes(data[lo:hi])
        write_tokens(part, out / f"{name}.txt", kind)
        print(f"  {name}.txt: {hi - lo:,} {'bytes' if kind == 'enwik8' else 'characters'}")


def prepare_wikitext(archive: Path, out: Path) -> None:
    """Copy wiki.{split}.tokens out of the archive as {split}.txt (CRC checked)."""
    with open_zip(archive) as zf:
        members = {Path(i.filename).name: i for i in zf.infolist()}
        for name in SPLITS:
            info = members.get(f"wiki.{name}.tokens")
            if info is None:
                raise ArchiveError(f"{archive} has no wiki.{name}.tokens: it is not "
                                f"wikitext-103-v1.zip (the tokenised, non-raw version)")
            bar = progress(info.file_size, f"{name}.txt")
            with zf.open(info) as src, open(out / f"{name}.txt", "wb") as dst:
                for block in iter(lambda: src.read(CHUNK), b""):
                    dst.write(block)
                    if bar is not None:
                        bar.update(len(block))
            if bar is not None:
                bar.close()
            print(f"  {name}.txt: {info.file_size:,} bytes")


# --------------------------------------------------------------------------- archives
def open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ArchiveError(f"{archive} is not a valid zip archive ({err})") from None


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of the member named ``member`` (any folder), CRC checked."""
    with open_zip(archive) as zf:
        infos = [i for i in zf.infolist() if Path(i.filename).name == member]
        if not infos:
            raise ArchiveError(f"{archive} has no member named '{member}'")
        try:
            return zf.read(infos[0])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            raise ArchiveError(f"{archive} is corrupt ({err})") from None


def check_archive(archive: Path, name: str) -> None:
    """Cheap check of a downloaded archive: a readable zip holding what we need, of the
    official size (from the zip directory, without decompressing)."""
    spec = SPECS[name]
    with open_zip(archive) as zf:
        infos = {Path(i.filename).name: i for i in zf.infolist()}
    needed = [spec.member] if spec.member else [f"wiki.{s}.tokens" for s in SPLITS]
    missing = [n for n in needed if n not in infos]
    if missing:
        raise ArchiveError(f"{archive} lacks {', '.join(missing)}")
    if spec.full_size and infos[spec.member].file_size != spec.full_size:
        raise ArchiveError(f"{archive}: its member {spec.member} has "
                           f"{infos[spec.member].file_size:,} bytes, not {spec.full_size:,}")


def download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` with curl, wget or urllib, via a .part file."""
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    tty = sys.stderr.isatty()  # show the tool's progress bar; else keep its errors for ours
    if shutil.which("curl"):
        cmd = ["curl", "-fL", "--retry", "2", "--connect-timeout", "30", "-o", str(part), url]
        cmd[1:1] = ["--progress-bar"] if tty else ["-sS"]
    elif shutil.which("wget"):
        cmd = ["wget", *(["-q", "--show-progress"] if tty else ["-nv"]), "-O", str(part), url]
    else:
        cmd = None
    try:
        if cmd is None:
            urllib_download(url, part)
        else:
            run = subprocess.run(cmd, stderr=None if tty else subprocess.PIPE, text=True)
            if run.returncode != 0:
                said = (run.stderr or "").strip().splitlines()
                raise OSError(said[-1] if said else f"{cmd[0]} exit status {run.returncode}")
    except OSError as err:  # urllib's URLError is an OSError
        part.unlink(missing_ok=True)
        raise ArchiveError(f"download of {url} failed ({err})") from None
    except BaseException:  # Ctrl-C: no partial file either
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)


def urllib_download(url: str, part: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as f:
        bar = progress(int(resp.headers.get("Content-Length") or 0) or None, part.name)
        for block in iter(lambda: resp.read(1 << 20), b""):
            f.write(block)
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()


def fetch(name: str, out: Path) -> Path:
    """A verified archive for ``name``: a previous download next to ``out``, or a new one."""
    spec = SPECS[name]
    dest = out.parent / spec.archive
    if dest.exists():
        try:
            check_archive(dest, name)
            print(f"using the archive downloaded before: {dest}")
            return dest
        except PrepError as err:
            aside = dest.with_name(dest.name + ".invalid")
            os.replace(dest, aside)
            print(f"{err}; moved it to {aside}, downloading it again")
    errors = []
    for url in spec.urls:
        try:
            download(url, dest)
            check_archive(dest, name)
            return dest
        except PrepError as err:
            errors.append(str(err))
            dest.unlink(missing_ok=True)
    raise ArchiveError("; ".join(errors))


# --------------------------------------------------------------------------- one dataset
def existing_state(out: Path, name: str, test_size: Optional[int]) -> bool:
    """True when ``out`` is ready to use (skip), False when it must be prepared."""
    marker = out / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        done = info.get("test_size")
        if test_size is not None and done is not None and done != test_size:
            raise PrepError(f"{out} was prepared with --test-size {done}, not {test_size}; "
                            f"give another folder for --test-size {test_size}")
        if test_size is None and done not in (None, 5_000_000):
            print(f"note: {out} was prepared with --test-size {done:,} (the standard is 5,000,000)")
        print(f"{name}: {out} is already prepared, skipping")
        return True
    if out.is_file():
        raise PrepError(f"{out} is a file, not a folder to prepare {name} into; main.py reads a "
                        f"text file as it is (--data {out}), or give a new folder name")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    for pattern in ("{}.txt", "wiki.{}.tokens"):  # both are read by data.py
        if all((out / pattern.format(s)).is_file() for s in SPLITS):
            print(f"{name}: {out} holds {pattern.format('{train,valid,test}')} without {MARKER} "
                  f"(made by another tool?); using it as is")
            return True
    raise PrepError(f"{out} holds other files and is not a complete prepared folder (no {MARKER}, "
                    f"no train/valid/test files); it is left as it is: give a new folder name")


def prepare_one(name: str, out: Path, archive: Optional[Path], test_size: Optional[int]) -> None:
    if existing_state(out, name, test_size):
        return
    n = 5_000_000 if test_size is None else test_size
    made = [p for p in reversed(out.parents) if not p.exists()]  # folders this run creates
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        prepare_into(name, out, archive, n)
    except BaseException:  # a failed or interrupted run leaves no folder it made
        for folder in reversed(made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    print(f"{name}: done -> {out}")


def prepare_into(name: str, out: Path, archive: Optional[Path], n: int) -> None:
    """Fetch (unless ``archive`` is given) and prepare ``name`` into ``out`` (absent or empty),
    through a temporary sibling folder renamed at the end."""
    if archive is None:
        archive = fetch(name, out)
    elif not archive.is_file():
        raise ArchiveError(f"--from-archive {archive}: no such file")
    print(f"{name}: preparing {out} from {archive}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        info = fill_folder(name, archive, tmp, n)
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fill_folder(name: str, archive: Path, tmp: Path, test_size: int) -> dict:
    """Write the prepared files of ``name`` into ``tmp``; returns the marker content."""
    info = {"dataset": name, "archive": str(archive.resolve())}
    if name == "wikitext-103":
        prepare_wikitext(archive, tmp)
        return info
    data = read_member(archive, SPECS[name].member)
    if len(data) != SPECS[name].full_size:
        print(f"note: this {name} has {len(data):,} bytes, not the official "
              f"{SPECS[name].full_size:,}: figures on it are not {name} results")
    prepare_chars(data, tmp, name, test_size)
    info.update(test_size=test_size, member_bytes=len(data),
                member_sha256=hashlib.sha256(data).hexdigest())
    return info


# --------------------------------------------------------------------------- command line
USAGE = """bash scripts/get_data.sh {enwik8|text8|wikitext-103|all} [DIR] [--from-archive PATH] [--test-size N]

  enwik8 | text8 | wikitext-103   prepare that dataset into DIR itself
                                  (DIR/train.txt, ...; default data/<name>)
  all                             prepare all three, each into DIR/<name> (default DIR: data)
  --from-archive PATH             use this zip (enwik8.zip, text8.zip or wikitext-103-v1.zip)
                                  instead of downloading; one dataset only
  --test-size N                   bytes (characters) of valid and of test for enwik8/text8,
                                  taken from the end (default 5000000: 90M/5M/5M)

A prepared folder holds .prepared.json and is skipped on later runs. Archives downloaded
are kept next to the folder (e.g. data/enwik8.zip) and reused."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, usage=USAGE, add_help=True)
    parser.add_argument("dataset", choices=[*SPECS, "all"])
    parser.add_argument("dir", nargs="?", default=None)
    parser.add_argument("--from-archive", type=Path, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    args = parser.parse_args(argv)
    if args.dataset == "all" and args.from_archive is not None:
        parser.error("--from-archive takes one dataset, not 'all'")
    if args.dataset == "wikitext-103" and args.test_size is not None:
        parser.error("--test-size applies to enwik8 and text8 only")
    return args


def targets(args):
    if args.dataset == "all":
        return [(name, Path(args.dir or "data") / name) for name in SPECS]
    return [(args.dataset, Path(args.dir or f"data/{args.dataset}"))]


def main(argv=None) -> int:
    args = parse_args(argv)
    for name, out in targets(args):
        try:
            test_size = None if name == "wikitext-103" else args.test_size
            prepare_one(name, out, args.from_archive, test_size)
        except PrepError as err:
            hint = "" if not isinstance(err, ArchiveError) else (
                f". To prepare it offline, download {SPECS[name].urls[0]} yourself and run: "
                f"bash scripts/get_data.sh {name} {out} --from-archive PATH/{SPECS[name].archive}")
            print(f"{PROG}: error: {name}: {err}{hint}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; {out} was not written", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
