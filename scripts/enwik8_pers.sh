#!/usr/bin/env bash
# enwik8 with persistent memory, 36 layers (published: 114M parameters, 1.00 bpb dev / 0.98 test).
# The second phase fine-tunes the checkpoint with a 10x smaller learning rate.
# usage: bash scripts/enwik8_pers.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=enwik8_pers
DATASET=enwik8
VOCAB=205
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 36 --hid-sz 512 --inner-hid-sz 1 --pers-mem-size 2048 --nheads 8 --attn-span 8192
       --block-sz 512 --dropout 0.4 --adapt-span-loss 1e-7 --lr-warmup 32000 --batch-split 2)
PHASES=("--niter 200" "--lr 0.007 --niter 210")
launch "$@"
