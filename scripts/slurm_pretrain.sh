#!/bin/bash
# Pretraining on several nodes under SLURM: one torchrun launcher per node (srun starts them), which meet in
# a c10d rendezvous on the job's first node and start one process per GPU. Arguments go to pretrain.py;
# submit from the repository root:
#
#   sbatch --nodes=4 scripts/slurm_pretrain.sh configs/freeze_vision.py --data_root=/data --out_dir=/shared/out/fv
#
# out_dir must be on a filesystem every node sees (rank 0 writes the checkpoints, every rank reads one to
# resume); data_root too, or an identical copy on each node. batch_size stays the global batch: more nodes
# mean fewer accumulation steps, not a different recipe. Resubmitting the same command resumes the run.
#SBATCH --job-name=vlenc-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
srun torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:29500" \
    --rdzv_id="$SLURM_JOB_ID" \
    pretrain.py "$@"
