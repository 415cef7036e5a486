"""Kernels per device for the batchnorm:: ops (ops.py defines the ops and calls register here).

    cpu/          C++ (at::vec, at::parallel_for on torch's thread pool), built at install time as
                  the extension batchnorm.kernels.cpu._C; registered for the CPU dispatch key
    triton.py     Triton, for CUDA tensors of the dtypes in its DTYPES (imported on first use)
    composite.py  torch operations: the CompositeExplicitAutograd kernels, i.e. every device
                  without kernels of its own (and CPU without the extension), and the contract

`BATCHNORM_KERNELS=composite` in the environment leaves the native CPU kernels unregistered;
`with kernels.use("composite"):` serves CPU and CUDA tensors with the composite for a while
("torch", the name these had before, is accepted for both), and
`with kernels.serving(device_type, module):` with any module holding the four primitives (tests
and benchmarks compare backends that way).
"""

import contextlib
import importlib
import os
import warnings
from types import ModuleType

import torch

from batchnorm.kernels import composite

_COMPOSITE_NAMES = ("composite", "torch")   # "torch": the earlier name, still accepted
_FORCED = os.environ.get("BATCHNORM_KERNELS") or None
PRIMITIVES = ("stats", "elemt", "backward_reduce", "backward_elemt")
FUSED = ("forward_train", "backward_train", "forward_eval", "update_running_stats")  # composite
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_native_cpu = False
_serving: dict[str, str] = {}  # device type -> backend name, while serving() is active
_triton: ModuleType | None | bool = False  # False: not imported yet; None: not installed


def register(lib: torch.library.Library, names: tuple[str, ...]) -> None:
    """Register every device's kernels for the ops `names` of lib (called once, by ops.py)."""
    global _native_cpu
    for name in names:
        lib.impl(name, getattr(composite, name), "CompositeExplicitAutograd")
    for name in PRIMITIVES:
        lib.impl(name, _cuda_kernel(name), "CUDA")
    if _FORCED not in _COMPOSITE_NAMES:
        from batchnorm.kernels import cpu

        _native_cpu = cpu.load()


def _load_triton() -> ModuleType | None:
    global _triton
    if _triton is False:
        try:
            _triton = importlib.import_module("batchnorm.kernels.triton")
        except ImportError as missing:  # triton absent: the composite serves
            if (missing.name or "").startswith("batchnorm"):
                raise  # a bug in our own imports must not pass for "not installed"
            _triton = None
        if _triton is not None and not _triton.available():
            _triton = None
    return _triton if isinstance(_triton, ModuleType) else None  # never False by now


def _cuda_kernel(name: str):
    """A CUDA kernel for primitive `name`: Triton's for its dtypes, else the composite's."""
    def kernel(*args):
        module = _load_triton()
        dtype = args[0].dtype  # input, or grad_out (same dtype)
        if module is None or dtype not in module.DTYPES:
            module = composite
        return getattr(module, name)(*args)
    kernel.__name__ = f"{name}_cuda"
    return kernel


def native_cpu() -> bool:
    """True when the C++ kernels serve CPU tensors."""
    return _native_cpu


def backend_name(tensor: torch.Tensor) -> str:
    """'cpu' (the C++ kernels), 'triton' or 'composite': what serves this tensor now."""
    device = tensor.device.type
    if device in _serving:
        return _serving[device]
    if device == "cpu" and _native_cpu:
        return "cpu"
    triton = _load_triton() if device == "cuda" else None
    if triton is not None and tensor.dtype in triton.DTYPES:
        return "triton"
    return "composite"


@contextlib.contextmanager
def serving(device_type: str, module: ModuleType, name: str | None = None):
    """Serve device_type's tensors with module's four primitives (and the composite fused ops
    on top of them) for the duration: a registration that is removed again on exit."""
    if device_type not in _DISPATCH_KEY:
        raise ValueError(f"kernels.serving expects one of {sorted(_DISPATCH_KEY)}, got "
                         f"{device_type!r}")
    lib = torch.library.Library("batchnorm", "IMPL")
    key = _DISPATCH_KEY[device_type]
    previous = _serving.get(device_type)
    with warnings.catch_warnings():  # torch warns that the registration overrides another
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")
        for op in PRIMITIVES:
            lib.impl(op, getattr(module, op), key)
        for op in FUSED:
            lib.impl(op, getattr(composite, op), key)
    _serving[device_type] = name or module.__name__.rsplit(".", 1)[-1]
    try:
        yield
    finally:
        lib._destroy()
        if previous is None:
            _serving.pop(device_type, None)
        else:
            _serving[device_type] = previous


@contextlib.contextmanager
def use(name: str | None):
    """'composite': serve CPU and CUDA tensors with the composite for the duration; None: as set
    up."""
    if name is not None and name not in _COMPOSITE_NAMES:
        raise ValueError(f"kernels.use expects 'composite' or None, got {name!r}")
    if name is None:
        yield
        return
    with serving("cpu", composite), serving("cuda", composite):
        yield
