#!/usr/bin/env bash
# Runs the checks and the test suite (creating .venv first if needed): ruff (lint), mypy (types,
# configured in pyproject.toml), then pytest. Extra arguments go to pytest.
# One thread each for torch (our kernels run on its pool) and BLAS: OpenMP pools oversubscribe 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
"$python" -m ruff check src tests benchmarks
"$python" -m mypy
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec "$python" -m pytest -q -n 2 "$@"
