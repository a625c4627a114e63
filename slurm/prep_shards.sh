#!/bin/bash
# Data prep as a SLURM job array: array task i of N converts its contiguous, disjoint slice of the sorted
# input into its own range of shard numbers (numbered exactly as one single run would number them) and
# writes OUT/manifest.task-i-of-N.json; the last task to finish merges them into OUT/manifest.json.
#
#   sbatch --array=0-15 slurm/prep_shards.sh images --input /data/imagenet/train \
#          --output /data/imagenet_shards --shard-size 1000 [--resize 256 ...]
#
# The first argument names the prep module (data_prep.<name>); the rest are its own options.
# Array indices run from 0 to N-1. To redo only task 7 of 16: sbatch --array=7 slurm/prep_shards.sh
# images ... --num-tasks 16 (finished shards of a re-run are kept). Submit from the repository root.
# Log: slurm/logs/<job name>-<array job id>_<task>.out
#SBATCH --job-name=d2v-prep
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=08:00:00
#SBATCH --output=slurm/logs/%x-%A_%a.out

source slurm/env.sh || { echo "run sbatch from the repository root" >&2; exit 2; }
set -eo pipefail
module=${1:?usage: sbatch --array=0-N slurm/prep_shards.sh <images|...> --input DIR --output OUT [options]}
shift
tasks=$SLURM_ARRAY_TASK_COUNT out=
args=("$@")
for i in "${!args[@]}"; do  # the output directory and a --num-tasks override, for the merge below
    case ${args[i]} in
        --output) out=${args[i + 1]} ;;  --output=*) out=${args[i]#--output=} ;;
        --num-tasks) tasks=${args[i + 1]} ;;  --num-tasks=*) tasks=${args[i]#--num-tasks=} ;;
    esac
done
srun python -m "data_prep.$module" --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks "$SLURM_ARRAY_TASK_COUNT" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" --quiet "$@"

# Each task writes its manifest before it looks, so the last one to finish sees all N (if two finish
# together, both merge the same parts into the same manifest.json, written atomically).
done=$(find "$out" -maxdepth 1 -name "manifest.task-*-of-$(printf %05d "$tasks").json" | wc -l)
if [ "$tasks" -eq 1 ]; then
    echo "single task: $out/manifest.json written directly"
elif [ "$done" -eq "$tasks" ]; then
    python -m data_prep.core merge "$out"
else
    echo "task $SLURM_ARRAY_TASK_ID: $done of $tasks task manifests present; the last task merges them"
fi
