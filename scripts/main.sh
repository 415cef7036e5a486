#!/usr/bin/env bash
# The main job on the embedded default data (creating .venv first if needed): Figure 1 of the
# batch-norm paper (seeds 0-2 side by side unless --seeds says otherwise), written to
# out/paper/figure1.png and figure1.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
# one thread for torch (our kernels run on its pool) and BLAS, before Python starts their pools (small matrices)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" \
       MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "$python" -m batchnorm.cli paper "$@"
