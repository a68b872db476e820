#!/bin/bash
# Run a whole specsweep sweep driver as a small CPU job, so the sweep survives logout.
#
#   sbatch launchers/sbatch-sweep.sh hydra/launcher=slurm_gpu draft=160m,7b tree=chain,binary
#
# The arguments are passed to `python -m specsweep -m`. The driver submits the grid as one SLURM
# array job (hydra-submitit-launcher), waits for every job to end, then exits; its own log is
# specsweep-driver-<jobid>.out in the directory you ran sbatch from. Submit from the repo root.
#
# Environment (exported to the job by sbatch's default --export=ALL):
#   SPECSWEEP_PYTHON  interpreter for the driver (default: ./.venv/bin/python if present, else python3).
#                     The grid's jobs run with the same interpreter, so it must exist on the
#                     compute nodes (a shared filesystem path).
#   SPECSWEEP_SETUP   optional shell snippet run first, e.g. "module load python/3.11"
#
# Adjust the #SBATCH lines for your site (a CPU partition, an account). The time limit must cover
# the whole sweep, queueing included: if the driver is killed, the grid's jobs keep running and
# their results still land in the sweep dir, but the driver's end-of-sweep step does not run.
#SBATCH --job-name=specsweep-driver
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=2-00:00:00
#SBATCH --output=specsweep-driver-%j.out
##SBATCH --partition=cpu
##SBATCH --account=myproject
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"

if [[ $# -eq 0 ]]; then
    echo "usage: sbatch launchers/sbatch-sweep.sh [hydra overrides...]" >&2
    exit 2
fi

if [[ -n "${SPECSWEEP_SETUP:-}" ]]; then
    eval "$SPECSWEEP_SETUP"
fi

if [[ -n "${SPECSWEEP_PYTHON:-}" ]]; then
    PY="$SPECSWEEP_PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY="$PWD/.venv/bin/python"
else
    PY="python3"
fi

# The driver's own SLURM_* variables would otherwise leak into the jobs it submits (sbatch exports
# the caller's environment) and can clash with their settings (e.g. SLURM_MEM_PER_NODE against a
# job's --mem-per-cpu). Keep the few that configure the client commands.
export SPECSWEEP_DRIVER_JOB_ID="${SLURM_JOB_ID:-}"
for v in $(compgen -e | grep '^SLURM_' || true); do
    case "$v" in
        SLURM_CONF|SLURM_CLUSTERS) ;;
        *) unset "$v" ;;
    esac
done

echo "specsweep driver: job ${SPECSWEEP_DRIVER_JOB_ID:-none} on $(hostname -s), $(date -Is)"
echo "+ $PY -m specsweep -m $*"
exec "$PY" -m specsweep -m "$@"
