#!/usr/bin/env bash
# Download and prepare the datasets in the reference on-disk format.
#
#   bash scripts/get_data.sh {enwik8|text8|wikitext-103|all} [DIR] [--from-archive PATH] [--test-size N]
#
# enwik8 | text8 | wikitext-103: prepared into DIR itself (default data/<name>).
# all: each dataset into DIR/<name> (default DIR: data).
# --from-archive PATH: prepare offline from a zip you downloaded yourself.
# --test-size N: size of valid and of test for enwik8/text8 (default 5000000).
# Already prepared folders (marker file .prepared.json) are skipped.
# The work is done by scripts/prepare_data.py (numpy, tqdm); see its docstring for the formats.
set -euo pipefail
src="${BASH_SOURCE[0]}"
[[ "$src" == */* ]] && here="${src%/*}" || here=.
python_bin="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$python_bin" ]]; then
    echo "get_data.sh: error: no python found (set PYTHON=/path/to/python)" >&2
    exit 1
fi
exec "$python_bin" "$here/prepare_data.py" "$@"
