#!/usr/bin/env bash
# text8, 12 layers (published: 38M parameters (39M in the README), 1.05 bpc dev / 1.11 test).
# usage: bash scripts/text8.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=text8
DATASET=text8
VOCAB=28
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --nheads 8 --attn-span 8192 --block-sz 512
       --dropout 0.3 --adapt-span-loss 5e-7 --lr-warmup 32000)
PHASES=("--niter 900")
launch "$@"
