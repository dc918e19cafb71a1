#!/usr/bin/env bash
# WikiText-103 with persistent memory, 36 layers, adaptive input and softmax (tied)
# (published: 133M parameters, 18.8 ppl dev / 19.7 test, end-of-line counted as a token).
# The second phase fine-tunes the checkpoint with a 10x smaller learning rate.
# usage: bash scripts/wiki103_pers.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=wiki103_pers
DATASET=wikitext-103
VOCAB=267735
FLAGS=(--optim adam --lr 2.5e-4 --lr-warmup 8000 --grad-clip 1 --batch-sz 64 --batch-split 2
       --nbatches 1000 --data-unit ppl
       --nlayers 36 --hid-sz 512 --inner-hid-sz 1 --pers-mem-size 2048 --nheads 8
       --attn-span 2048 --block-sz 256 --dropout 0.3 --emb-dropout 0.1
       --adapt-span --adapt-span-loss 5e-7 --adapt-span-cache --adapt-io --adapt-io-tied)
PHASES=("--niter 800" "--lr 2.5e-5 --niter 850")
launch "$@"
