"""Kernels per device for the batchnorm:: ops (ops.py defines the ops and calls register here), and
the one switch that says which backend serves a tensor.

    cpu/          C++ (at::vec, at::parallel_for on torch's thread pool), built at install time as
                  the extension batchnorm.kernels.cpu._C; registered for the CPU dispatch key and
                  its training autograd node for AutogradCPU
    triton.py     Triton, for CUDA tensors of the dtypes in its DTYPES (imported on first use);
                  not yet verified on a GPU, so it serves only when asked for
    composite.py  torch operations: the CompositeExplicitAutograd kernels and the contract every
                  backend implements; the test oracle, never a user's default path

Backends (what backend_name answers, and what functional.batch_norm's router reads):

    "cpu"        our C++ kernels: CPU tensors, by default, when the extension loaded
    "aten"       torch's own batch-norm kernels (cuDNN on CUDA): every tensor ours do not serve;
                 forced everywhere by BATCHNORM_KERNELS=aten or `with kernels.use("aten"):`
    "composite"  the composite, on CPU and CUDA: BATCHNORM_KERNELS=composite or
                 `with kernels.use("composite"):` (tests; "torch", its earlier name, is accepted)
    "triton"     the Triton kernels for CUDA tensors of their dtypes: BATCHNORM_KERNELS=triton or
                 `with kernels.use("triton"):`

The environment variable and the context manager do the same thing: the variable enters use(name)
at import, for the whole process. `with kernels.serving(device_type, module):` serves a device with
any module holding the four primitives (tests and benchmarks compare backends that way).
"""

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from batchnorm.kernels import composite

BACKENDS = ("aten", "composite", "triton")  # what use() and BATCHNORM_KERNELS take
_ALIASES = {"torch": "composite"}  # the composite's earlier name, still accepted
PRIMITIVES = ("stats", "elemt", "backward_reduce", "backward_elemt")
FUSED = ("forward_train", "backward_train", "forward_eval", "update_running_stats")  # composite
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_native_cpu = False
_serving: dict[str, str] = {}  # device type -> backend name, while use() or serving() is active
_triton: ModuleType | None | bool = False  # False: not imported yet; None: not installed


def _backend(name: str | None, where: str) -> str | None:
    """name checked and unaliased (None: the default)."""
    name = _ALIASES.get(name, name) if name else None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{where} expects one of {', '.join(map(repr, BACKENDS))} or None (the "
                         f"default: ours where verified, torch's elsewhere), got {name!r}")
    return name


_FORCED = _backend(os.environ.get("BATCHNORM_KERNELS"), "BATCHNORM_KERNELS")


def register(lib: torch.library.Library, names: tuple[str, ...]) -> None:
    """Register every device's kernels for the ops `names` of lib (called once, by ops.py); then
    BATCHNORM_KERNELS, if set, takes effect for the process."""
    global _native_cpu
    for name in names:
        lib.impl(name, getattr(composite, name), "CompositeExplicitAutograd")
    for name in PRIMITIVES:
        lib.impl(name, _cuda_kernel(name), "CUDA")
    if _FORCED is None:  # the C++ kernels serve only the default; a forced backend never loads them
        from batchnorm.kernels import cpu

        _native_cpu = cpu.load()
        return
    try:
        _select(_FORCED)  # never undone: for the whole process
    except RuntimeError as unavailable:  # BATCHNORM_KERNELS=triton without Triton or a GPU
        warnings.warn(f"batchnorm: BATCHNORM_KERNELS={_FORCED} cannot be served ({unavailable}); "
                      f"torch's kernels serve instead", RuntimeWarning, stacklevel=2)


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
    """The CUDA kernel for primitive `name`: Triton's for its dtypes while the "triton" backend
    is selected; else the module serving() installed for CUDA, if any; else the composite's
    (which SyncBatchNorm's primitives run on CUDA by default). One registration, read at each
    call: torch (2.11 at least) refuses a second Python registration for the same key."""
    def kernel(*args):
        module = _load_triton() if _serving.get("cuda") == "triton" else _cuda_module
        dtype = args[0].dtype  # input, or grad_out (same dtype)
        if module is None or dtype not in getattr(module, "DTYPES", (dtype,)):
            module = composite
        return getattr(module, name)(*args)
    kernel.__name__ = f"{name}_cuda"
    return kernel


_cuda_module: ModuleType | None = None  # what serving("cuda", module) installed


def native_cpu() -> bool:
    """True when the C++ kernels are registered for CPU tensors."""
    return _native_cpu


def backend_name(tensor: torch.Tensor) -> str:
    """What serves this tensor now: 'cpu' (the C++ kernels), 'aten' (torch's kernels),
    'composite', 'triton', or the name given to serving()."""
    if tensor.is_cpu:  # the common case, without building a torch.device
        name = _serving.get("cpu")
        if name is None:
            return "cpu" if _native_cpu else "aten"
        return name
    device = tensor.device.type
    name = _serving.get(device)
    if name is None:
        return "aten"
    if name == "triton" and device == "cuda":  # Triton's dtypes; torch's kernels for the rest
        triton = _load_triton()
        return "triton" if triton is not None and tensor.dtype in triton.DTYPES else "aten"
    return name


@contextlib.contextmanager
def serving(device_type: str, module: ModuleType, name: str | None = None):
    """Serve device_type's tensors with module's four primitives (and the composite fused ops
    on top of them) for the duration: a registration that is removed again on exit."""
    undo = _serve(device_type, module, name or module.__name__.rsplit(".", 1)[-1])
    try:
        yield
    finally:
        undo()


@contextlib.contextmanager
def use(name: str | None):
    """Serve tensors with one backend for the duration, as BATCHNORM_KERNELS=name does for the
    whole process: 'aten' (torch's kernels, CPU and CUDA), 'composite' (CPU and CUDA), 'triton'
    (CUDA; Triton must be installed); None: as set up."""
    undo = _select(_backend(name, "kernels.use"))
    try:
        yield
    finally:
        undo()


def _select(name: str | None) -> Callable[[], None]:
    """Make backend `name` serve (None: nothing changes); returns what undoes it. Not a context
    manager: BATCHNORM_KERNELS selects for the whole process and is never undone."""
    undo: list[Callable[[], None]] = []
    if name == "aten":
        undo = [_name("cpu", "aten"), _name("cuda", "aten")]
    elif name == "composite":
        undo = [_serve("cpu", composite, "composite"), _serve("cuda", composite, "composite")]
    elif name == "triton":  # the CUDA registration (_cuda_kernel) reads the name
        if _load_triton() is None:
            raise RuntimeError("kernels.use('triton'): Triton is not installed or finds no "
                               "GPU (pip install 'batchnorm[gpu]')")
        undo = [_name("cuda", "triton")]

    def undo_all() -> None:
        for step in reversed(undo):
            step()
    return undo_all


def _serve(device_type: str, module: ModuleType, name: str) -> Callable[[], None]:
    """Register module's primitives (and the composite's fused ops) for device_type's dispatch
    key and name the backend; returns what undoes both."""
    if device_type not in _DISPATCH_KEY:
        raise ValueError(f"kernels.serving expects one of {sorted(_DISPATCH_KEY)}, got "
                         f"{device_type!r}")
    if device_type == "cuda":  # registered once, by register(): _cuda_kernel reads the module
        return _serve_cuda(module, name)
    lib = torch.library.Library("batchnorm", "IMPL")
    key = _DISPATCH_KEY[device_type]
    with warnings.catch_warnings():  # torch warns that the registration overrides another
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")
        for op in PRIMITIVES:
            lib.impl(op, getattr(module, op), key)
        for op in FUSED:
            lib.impl(op, getattr(composite, op), key)
    unname = _name(device_type, name)

    def undo() -> None:
        unname()
        lib._destroy()
    return undo


def _serve_cuda(module: ModuleType, name: str) -> Callable[[], None]:
    """_serve for CUDA: the primitives' one registration (_cuda_kernel) reads _cuda_module; the
    fused ops are the composite's there already (CompositeExplicitAutograd)."""
    global _cuda_module
    previous, _cuda_module = _cuda_module, module
    unname = _name("cuda", name)

    def undo() -> None:
        global _cuda_module
        unname()
        _cuda_module = previous
    return undo


def _name(device_type: str, name: str) -> Callable[[], None]:
    """backend_name answers `name` for device_type's tensors until the returned function runs."""
    previous = _serving.get(device_type)
    _serving[device_type] = name

    def undo() -> None:
        if previous is None:
            _serving.pop(device_type, None)
        else:
            _serving[device_type] = previous
    return undo
