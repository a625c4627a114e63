# Environment shared by the slurm/*.sh job scripts; sourced from the repository root (the submit dir).
# Rendezvous needs nothing here: pipeline.distributed takes RANK / WORLD_SIZE / LOCAL_RANK from
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR from the first host of SLURM_JOB_NODELIST
# and MASTER_PORT from SLURM_JOB_ID, the same on every rank.
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # per rank; data loading runs in worker processes
# Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task, so each rank and its DataLoader workers would
# share one core; SRUN_CPUS_PER_TASK hands it on (older Slurm ignores it)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
echo "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}), run $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_JOB_NUM_NODES} node(s)" \
     "${SLURM_JOB_NODELIST}, ${SLURM_NTASKS} tasks, started $(date -Is) in $(pwd)"
# SIGTERM (scancel, preemption, requeue) reaches the ranks too: keep this shell alive while they save.
trap 'echo "batch shell: SIGTERM (scancel, preemption or requeue)"' TERM
