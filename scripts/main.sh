#!/usr/bin/env bash
# The main job on the embedded default data (creating .venv first if needed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
exec "$python" -m batchnorm.cli claims "$@"
