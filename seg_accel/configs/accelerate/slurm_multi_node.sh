#!/usr/bin/env bash
# SLURM: N nodes x 8 GPUs, one `accelerate launch` per node (torchrun starts the 8 processes),
# nodes meeting through c10d rendezvous on the first node of the allocation.
#
#   sbatch --nodes 2 configs/accelerate/slurm_multi_node.sh configs/segformer/segformer_mit-b5_8xb1-160k_cityscapes-1024x1024.yaml
#
# The repository (with its .venv) and the work dir must be on a filesystem every node sees.
#SBATCH --job-name=seg-accel
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch slurm_multi_node.sh CONFIG.yaml [train.py options]}
shift
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}   # "a100:8" -> 8
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))

# srun starts this line once per node; SLURM_NODEID is that node's rank.
srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/accelerate launch \
    --config_file configs/accelerate/multi_node_c10d.yaml \
    --num_machines $SLURM_NNODES \
    --num_processes $(( SLURM_NNODES * GPUS_PER_NODE )) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_NODE \
    --main_process_port $MAIN_PORT \
    --rdzv_backend c10d \
    scripts/train.py $CONFIG $*
"
