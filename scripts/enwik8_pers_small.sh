#!/usr/bin/env bash
# enwik8 with persistent memory, 18 layers (published: 39M parameters, 1.03 bpb dev / 1.01 test).
# The second phase fine-tunes the checkpoint with a 10x smaller learning rate.
# usage: bash scripts/enwik8_pers_small.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=enwik8_pers_small
DATASET=enwik8
VOCAB=205
FLAGS=("${CHAR_FLAGS[@]}"
       --nlayers 18 --hid-sz 512 --inner-hid-sz 1 --pers-mem-size 1024 --nheads 8 --attn-span 8192
       --block-sz 512 --dropout 0.3 --adapt-span-loss 1e-7 --lr-warmup 32000 --batch-split 2)
PHASES=("--niter 450" "--lr 0.007 --niter 480")
launch "$@"
