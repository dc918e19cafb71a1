#!/usr/bin/env bash
# enwik8, 24 layers (published: 209M parameters, 1.00 bpb dev / 0.98 test).
# The second phase fine-tunes the checkpoint with a 10x smaller learning rate.
# usage: bash scripts/enwik8_large.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=enwik8_large
DATASET=enwik8
VOCAB=205
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 24 --hid-sz 768 --inner-hid-sz 4096 --nheads 8 --attn-span 8192 --block-sz 512
       --dropout 0.4 --adapt-span-loss 5e-7 --lr-warmup 32000 --batch-split 2)
PHASES=("--niter 150" "--lr 0.007 --niter 170")
launch "$@"
