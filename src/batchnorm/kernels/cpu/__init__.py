"""The native CPU backend: C++ kernels on ATen's vector types and torch's own thread pool.

    kernels.h / kernels.cpp   the kernels on raw pointers: both layouts read in place, each with
                              a fused training step forward and backward (see kernels.cpp)
    ops.cpp                   the batchnorm:: ops' CPU implementations on those kernels (checks,
                              layouts, the running-statistics update with its NaN/Inf guard) and
                              the Python module that registers them for the CPU dispatch key
    compile_flags.py          the sources and compiler flags, for both builds below
    build.py                  the first-use build into a per-user cache

They become the extension batchnorm.kernels.cpu._C in one of two ways: at install time, where
torch is installed first and the package after it without build isolation (setup.py; scripts/
env.sh does that), or on first use, where the install had no torch to build against (an ordinary
`pip install`): the first import compiles the bundled sources against the installed torch,
once, into ~/.cache/batchnorm (build.py; BATCHNORM_BUILD=0 turns that off). Without either the
package runs on torch's own kernels and says so once.
"""

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

_C: ModuleType | None = None  # the extension, once load() found it
# _C.forward_train once loaded: the op batchnorm::forward_train through the dispatcher from C++,
# returning (output, finite), or NotImplemented where torch.ops must call it (ops.py)
forward_train: Callable[..., Any] | None = None
# _C.forward_eval likewise for batchnorm::forward_eval (returns the output, or NotImplemented)
forward_eval: Callable[..., Any] | None = None


def load() -> bool:
    """Register the C++ kernels for the CPU dispatch key, compiling them first if no build for
    this torch exists; False (with one warning) if they cannot run here. Call after the ops are
    defined."""
    global _C, forward_train, forward_eval
    from batchnorm.kernels.cpu import build

    try:
        module = build.find()
    except build.Unavailable as why:
        warnings.warn(f"batchnorm: the native CPU kernels are not available: {why.cause}. CPU "
                      f"tensors run on torch's own kernels instead. {why.fix}.", RuntimeWarning,
                      stacklevel=2)
        return False
    if not module.register_kernels():
        warnings.warn(f"batchnorm: the native CPU kernels were compiled for "
                      f"{module.compiled_capability()}, which this processor lacks; CPU tensors "
                      f"run on torch's own kernels instead. Build them on this machine: unset "
                      f"BATCHNORM_CPU_CAPABILITY, or reinstall the package here.", RuntimeWarning,
                      stacklevel=2)
        return False
    _C = module
    forward_train = module.forward_train
    forward_eval = module.forward_eval
    return True


def compiled_capability() -> str | None:
    """'AVX512', 'AVX2' or 'DEFAULT' for the loaded kernels; None when none are loaded."""
    return None if _C is None else _C.compiled_capability()
