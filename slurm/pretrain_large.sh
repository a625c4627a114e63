#!/bin/bash
# data2vec ViT-L/16 pretraining (configs/vision_large.yaml): 8 nodes x 8 GPUs, one rank per GPU,
# global batch 64 images x 64 ranks = 4096, as the released ViT-L command (data2vec_vision beit/README.md:66).
#
#   sbatch slurm/pretrain_large.sh [--config configs/<preset>.yaml] [key.sub=value ...]
#
# Submit from the repository root. sbatch options override the resources below (e.g. sbatch -N 16);
# the global batch is train.micro_batch_size x train.grad_accum x data-parallel ranks. Nodes without
# GPUs run CPU ranks with the same script (sbatch -N1 -n2 --gpus-per-node=0 ... as tests/test_slurm.py).
# Log: slurm/logs/<job name>-<job id>.out (a requeued job appends to the same file).
# Many nodes: parallel.shard=8 keeps ZeRO-3 inside each node (one replica per node); with
# train.grad_reduce=compute it sends half the inter-node bytes (README, SLURM; python -m pipeline.plan shows it).
#SBATCH --job-name=d2v-vit-large
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
#SBATCH --signal=USR2@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

# SIGUSR2, sent 10 min before the time limit (so keep --time well above that) or by hand with
# `scancel --signal=USR2 JOBID`: every rank agrees on a step, saves a checkpoint there, and rank 0
# requeues the job, which resumes from that checkpoint. A rank that dies ends the whole job at once.
source slurm/env.sh || { echo "run sbatch from the repository root" >&2; exit 2; }
srun --kill-on-bad-exit=1 python -m pipeline.train --config configs/vision_large.yaml "$@"
