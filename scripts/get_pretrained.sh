#!/usr/bin/env bash
# Fetch the authors' pretrained checkpoints into checkpoints/<name>.pt and print how to evaluate them.
#
#   bash scripts/get_pretrained.sh [--from DIR] [--force] [NAME ...]
#
# NAME: enwik8 text8 enwik8_large text8_large (default: all four; there are no pretrained
# persistent-memory or WikiText-103 models). Downloads
# https://dl.fbaipublicfiles.com/adaptive-span/<name>.pt, or with --from DIR copies DIR/<name>.pt
# (files you downloaded yourself). An existing checkpoints/<name>.pt is kept unless --force:
# it may be your own training run. CHECKPOINT_DIR (default checkpoints) changes the folder.
set -euo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$self")/.."

BASE_URL=https://dl.fbaipublicfiles.com/adaptive-span
ALL=(enwik8 text8 enwik8_large text8_large)
from="" force=0 names=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --from) from="${2:?--from needs a folder}"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,10p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
        enwik8|text8|enwik8_large|text8_large) names+=("$1"); shift ;;
        *) echo "get_pretrained.sh: error: unknown argument '$1' (names: ${ALL[*]})" >&2; exit 2 ;;
    esac
done
[[ ${#names[@]} -gt 0 ]] || names=("${ALL[@]}")

fail() {  # one line on stderr
    echo "get_pretrained.sh: error: $*" >&2
}

download() {  # url dest: exit status 0 on success
    if command -v curl >/dev/null; then
        curl -fL --retry 2 --connect-timeout 30 --progress-bar -o "$2" "$1"
    elif command -v wget >/dev/null; then
        wget -q --show-progress -O "$2" "$1"
    else
        "${PYTHON:-python}" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    fi
}

looks_like_checkpoint() {  # a torch.save file: zip ("PK") or legacy pickle (0x80)
    local magic
    magic=$(head -c 2 "$1" | od -An -tx1 | tr -d ' \n')
    [[ "$magic" == 504b || "$magic" == 80* ]]
}

dir="${CHECKPOINT_DIR:-checkpoints}"
status=0
mkdir -p "$dir"
for name in "${names[@]}"; do
    dest="$dir/$name.pt" part="$dir/$name.pt.part"
    if [[ -e "$dest" && $force -eq 0 ]]; then
        echo "$dest exists, kept (use --force to replace it)"
    elif [[ -n "$from" ]]; then
        if [[ ! -f "$from/$name.pt" ]]; then
            fail "$from/$name.pt: no such file"; status=1; continue
        fi
        cp "$from/$name.pt" "$part"
    else
        echo "downloading $BASE_URL/$name.pt -> $dest"
        if ! download "$BASE_URL/$name.pt" "$part"; then
            rm -f "$part"
            fail "could not download $BASE_URL/$name.pt. Download it yourself, then run:" \
                 "bash scripts/get_pretrained.sh --from DIR $name"
            status=1; continue
        fi
    fi
    if [[ -e "$part" ]]; then
        if ! looks_like_checkpoint "$part"; then
            rm -f "$part"
            fail "$name.pt is not a PyTorch checkpoint (truncated or an error page?)"
            status=1; continue
        fi
        mv "$part" "$dest"
        echo "$dest ready"
    fi
    if [[ "$dir" == checkpoints ]]; then
        echo "  evaluate it with: bash scripts/$name.sh --eval"
    else
        echo "  evaluate it with: CHECKPOINT=$dest bash scripts/$name.sh --eval"
    fi
done
exit $status
