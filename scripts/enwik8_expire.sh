#!/usr/bin/env bash
# enwik8 with Expire-span, 12 layers (Sukhbaatar et al. 2021, published: 38M parameters,
# 1.014 bpb dev / 0.994 test): batch 512 over 8 GPUs, position embeddings over the block
# (--attn-span = --block-sz), memories up to --attn-lim 16384 back. The second phase
# fine-tunes the checkpoint with a 10x smaller learning rate.
# usage: bash scripts/enwik8_expire.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [main.py flags...]
# (options: scripts/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=enwik8_expire
DATASET=enwik8
VOCAB=205
FLAGS=(--optim adam --lr 7e-4 --lr-warmup 8000 --grad-clip 0.3 --batch-sz 512 --nbatches 1000
       --nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --nheads 8 --attn-span 512 --block-sz 512
       --dropout 0.3 --expire-span --attn-lim 16384 --expire-span-ramp 128 --expire-span-loss 1e-6)
PHASES=("--niter 100" "--lr 7e-5 --niter 110")
launch "$@"
