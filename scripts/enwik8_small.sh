#!/usr/bin/env bash
# Small enwik8 model (8 layers, H 256): about 1.3 bpb on dev after 150k steps; 6.48M parameters.
# usage: bash scripts/enwik8_small.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=enwik8_small
DATASET=enwik8
VOCAB=205
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 8 --hid-sz 256 --inner-hid-sz 1024 --nheads 4 --attn-span 1024 --block-sz 256
       --dropout 0 --adapt-span-loss 2e-6 --lr-warmup 8000)
PHASES=("--niter 150")
launch "$@"
