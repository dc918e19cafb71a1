#!/usr/bin/env bash
# Train on a SLURM cluster. The arguments are main.py flags; the configuration scripts print
# theirs with --print-flags (one line per training phase). Two launchers (LAUNCHER=...):
#   srun      (default) one SLURM task per GPU; each task runs main.py with RANK, WORLD_SIZE and
#             LOCAL_RANK taken from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, and the
#             processes meet at MASTER_ADDR:MASTER_PORT (the first node). SLURM's signals
#             (--signal=TERM@120, preemption) reach main.py directly.
#   torchrun  one task per node running torchrun, which starts one process per GPU and meets
#             the other nodes at a c10d rendezvous on the first node.
# Run from the repository root, after preparing the data on a machine with internet access
# (compute nodes often have none):
#
#   bash scripts/get_data.sh enwik8
#   flags=$(bash scripts/enwik8_large.sh --print-flags)          # 2 lines: train, fine-tune
#   jid=$(sbatch --parsable --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 scripts/slurm.sh $(sed -n 1p <<<"$flags"))
#   sbatch --dependency=afterok:$jid --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 scripts/slurm.sh $(sed -n 2p <<<"$flags")
#   bash scripts/enwik8_large.sh --eval                           # full evaluation, one GPU
#
# --batch-sz is the global batch: it is divided among all processes (nodes x GPUs), so it
# must be divisible by their number. Resubmitting the same line resumes from --checkpoint.
# Partition, account and time limit are cluster specific: add them to the sbatch line.
#
#SBATCH --job-name=adaptive-span
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --signal=TERM@120
#SBATCH --gpus-per-node=8
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "slurm.sh: error: submit it with sbatch (see the comment at its top)" >&2
    exit 2
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # not head: SIGPIPE + pipefail
MASTER_PORT=${MASTER_PORT:-29500}
# GPUs per node: what SLURM granted, else what the node shows.
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | grep -c '^GPU')}
export MASTER_ADDR MASTER_PORT GPUS_PER_NODE
echo "nodes=$SLURM_NNODES gpus/node=$GPUS_PER_NODE rendezvous=$MASTER_ADDR:$MASTER_PORT"

if [[ "${LAUNCHER:-srun}" == srun ]]; then
    # one task per GPU; the rank variables differ per task, so they are set inside it
    srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 bash -c '
        export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
        exec "${PYTHON:-python3}" main.py "$@" --distributed
    ' slurm-task "$@"
else
    # SLURM_NODEID differs per task, so it is expanded inside each task (single quotes).
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
        exec torchrun --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" \
            --nproc_per_node="$GPUS_PER_NODE" --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d \
            --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" main.py "$@" --distributed
    ' slurm-task "$@"
fi
