#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and prints its python.
# torch==2.13.0 goes in first: that CPU build lies on this kind of machine's disk; any other
# version would download gigabytes. pyproject.toml allows a range that 2.13.0 satisfies.
# The package is then installed editable without build isolation, so that its C++ CPU kernels
# (setup.py) are compiled against that torch (an isolated build would fetch another torch).
# It is reinstalled whenever pyproject.toml, setup.py, a C++ source or the compile flags change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
inputs=("$root/pyproject.toml" "$root/setup.py" "$root"/src/batchnorm/kernels/cpu/*.cpp
        "$root"/src/batchnorm/kernels/cpu/*.h "$root/src/batchnorm/kernels/cpu/compile_flags.py")
stamp="$venv/.installed-$(cat "${inputs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    # numpy, setuptools and ninja: the extension's build imports torch (which wants numpy) and
    # ninja compiles its sources in parallel
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0" numpy "setuptools>=68" wheel ninja >&2
    "$venv/bin/python" -m pip install --quiet --no-build-isolation -e "$root[dev]" >&2
    # BATCHNORM_BUILD=0: this checks the install-time build, not the first-use one
    BATCHNORM_BUILD=0 "$venv/bin/python" -c "import batchnorm.kernels as k, batchnorm; import sys; \
sys.exit(0 if k.native_cpu() else 'batchnorm: the native CPU kernels did not build (see above)')" >&2
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
echo "$venv/bin/python"
