"""Kernel backends, one file each, chosen per call by device and dtype.

    cpu.py        numba, for CPU tensors of the dtypes in its DTYPES
    triton.py     triton, for CUDA tensors of the dtypes in its DTYPES
    composite.py  torch operations: the fallback for every other device and dtype, and the
                  contract (semantics, layouts, dtypes) every backend implements

A backend module defines the four functions of composite.py, `DTYPES` (a set of torch dtypes)
and `available() -> bool` (False when it cannot run here, e.g. no GPU).

`BATCHNORM_KERNELS=torch` in the environment, or `with kernels.use("torch"):`, forces the
fallback (tests and benchmarks compare backends that way).
"""

import contextlib
import importlib
import os
from types import ModuleType

import torch

from batchnorm.kernels import composite

_forced: str | None = os.environ.get("BATCHNORM_KERNELS") or None
_loaded: dict[str, ModuleType | None] = {}

# Which optional module serves which device type.
_MODULE_FOR_DEVICE = {"cpu": "batchnorm.kernels.cpu", "cuda": "batchnorm.kernels.triton"}


def _load(device_type: str) -> ModuleType | None:
    """Import the device's backend once; None when it or its compiler is not installed."""
    if device_type not in _loaded:
        name = _MODULE_FOR_DEVICE.get(device_type)
        module = None
        if name is not None:
            try:
                module = importlib.import_module(name)
            except ImportError as missing:  # numba / triton absent: the fallback serves
                broken_here = (missing.name or "").startswith("batchnorm") and missing.name != name
                if broken_here:  # a bug in our own imports must not pass for "not installed"
                    raise
                module = None
            if module is not None and not module.available():
                module = None
        _loaded[device_type] = module
    return _loaded[device_type]


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The backend that runs the ops for this tensor's device and dtype."""
    if _forced == "torch":
        return composite
    module = _load(tensor.device.type)
    if module is not None and tensor.dtype in module.DTYPES:
        return module
    return composite


def backend_name(tensor: torch.Tensor) -> str:
    """'cpu', 'triton' or 'composite' (the torch fallback): which kernels this tensor would use."""
    return backend_for(tensor).__name__.rsplit(".", 1)[-1]


@contextlib.contextmanager
def use(name: str | None):
    """Force a backend for the duration: 'torch' for the fallback, None for the default choice."""
    global _forced
    if name not in (None, "torch"):
        raise ValueError(f"kernels.use expects 'torch' or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
