"""Shared test fixtures: the repository root and real text from ../shared/data."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Token caches of every test (and of the main.py processes they start) go to a temporary
# folder, never to the user's cache or a data folder.
_CACHE = tempfile.mkdtemp(prefix="adaptive-span-test-cache-")
os.environ["ADAPTIVE_SPAN_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The first 200 KB of the tiny-Shakespeare text, copied (byte-level runs, split 90/5/5)."""
    source = SHARED / "shakespeare" / "input.txt"
    if not source.exists():
        pytest.skip(f"shared data absent: {source}")
    path = tmp_path_factory.mktemp("data") / "input.txt"
    with open(source, "rb") as f:
        path.write_bytes(f.read(200_000))
    return path
