#!/usr/bin/env bash
# text8, 24 layers (published: 209M parameters, 1.01 bpc dev / 1.07 test).
# The second phase fine-tunes the checkpoint with a 10x smaller learning rate.
# usage: bash scripts/text8_large.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=text8_large
DATASET=text8
VOCAB=28
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 24 --hid-sz 768 --inner-hid-sz 4096 --nheads 8 --attn-span 8192 --block-sz 512
       --dropout 0.4 --adapt-span-loss 5e-7 --lr-warmup 32000 --batch-split 2)
PHASES=("--niter 250" "--lr 0.007 --niter 270")
launch "$@"
