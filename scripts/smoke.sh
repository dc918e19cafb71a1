#!/usr/bin/env bash
# Is this machine ready for a run? Checks the install on the machine a run will use and ends
# with one line: "smoke: READY ..." (exit status 0) or "smoke: NOT READY ...: failed: ..." (1).
#
#   bash scripts/smoke.sh          # a GPU node: bf16 steps of the enwik8 shape with and without
#                                  # torch.compile, NCCL ranks, checkpoint round trip (~5 min)
#   bash scripts/smoke.sh --cpu    # CPU only (CI): the quick start's shape in fp32, gloo ranks
#
# What each check does and what to compare its figures with: scripts/smoke.py, docs/performance.md.
# Environment: PYTHON (default python3), SMOKE_PEAK_TFLOPS (the GPU's peak, for the MFU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-$(command -v python3 || echo python)}" scripts/smoke.py "$@"
