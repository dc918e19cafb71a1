#!/usr/bin/env bash
# enwik8, 12 layers (published: 38M parameters, 1.04 bpb dev / 1.02 test).
# usage: bash scripts/enwik8.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=enwik8
DATASET=enwik8
VOCAB=205
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --nheads 8 --attn-span 8192 --block-sz 512
       --dropout 0.3 --adapt-span-loss 5e-7 --lr-warmup 32000)
PHASES=("--niter 600")
launch "$@"
