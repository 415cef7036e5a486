"""The native CPU backend: C++ kernels on ATen's vector types and torch's own thread pool.

    kernels.h / kernels.cpp   the kernels on raw pointers: both layouts read in place, each with
                              a fused training step forward and backward (see kernels.cpp)
    ops.cpp                   the batchnorm:: ops' CPU implementations on those kernels (checks,
                              layouts, the running-statistics update with its NaN/Inf guard) and
                              the Python module that registers them for the CPU dispatch key

They are built at install time as the extension batchnorm.kernels.cpu._C against the installed
torch (setup.py; `pip install --no-build-isolation -e .` after torch, as scripts/env.sh does).
Without it the package runs on the composite kernels in torch operations and says so once.
"""

import warnings

BUILD_HINT = ("build them with a C++ compiler and the installed torch: "
              "`pip install --no-build-isolation -e .` in the project (scripts/env.sh does it)")


def load() -> bool:
    """Register the C++ kernels for the CPU dispatch key; False (with one warning) if they
    cannot run here. Call after the ops are defined."""
    try:
        from batchnorm.kernels.cpu import _C
    except (ImportError, OSError) as missing:
        warnings.warn(f"batchnorm: the native CPU kernels are not available ({missing}); CPU "
                      f"tensors run on the slower torch-operations fallback. To {BUILD_HINT}",
                      RuntimeWarning, stacklevel=2)
        return False
    if not _C.register_kernels():
        warnings.warn(f"batchnorm: the native CPU kernels were compiled for "
                      f"{_C.compiled_capability()}, which this processor lacks; CPU tensors run "
                      f"on the torch-operations fallback. Rebuild them on this machine: "
                      f"{BUILD_HINT}", RuntimeWarning, stacklevel=2)
        return False
    return True


def compiled_capability() -> str | None:
    """'AVX512', 'AVX2' or 'DEFAULT' for the built kernels; None when they are not built."""
    try:
        from batchnorm.kernels.cpu import _C
    except (ImportError, OSError):
        return None
    return _C.compiled_capability()
