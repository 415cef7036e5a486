"""CPU backend: the four batch-norm primitives as fused numba kernels (kernels/_numba_kernels.py).

Same functions, arguments and results as kernels/composite.py (the contract). What this file adds
is the plumbing between torch and the kernels:

- Layout. Contiguous (N, C, *) input is read as (N, C, S); channels-last (N, *, C) and (N, C)
  input as (M, C), in place (numpy moveaxis + reshape: no transposing copy). grad_out, output and
  residual are brought to input's layout (a no-op when they are in it already, as ops.py ensures).
- Allocation. Results of 4 MiB and more are numpy-allocated (np.empty + torch.from_numpy, on a
  2 MiB boundary) with input's strides: numpy asks the kernel for transparent huge pages on
  large arrays (madvise); torch's CPU allocator does not unless THP_MEM_ALLOC_ENABLE=1, and the
  4 KiB page faults of a fresh output cost as much as the kernel writing it (RESULTS.md).
- Threads. torch and numba each have a thread pool. Before each kernel call numba's thread count
  is set to torch.get_num_threads() (capped by NUMBA_NUM_THREADS), so `torch.set_num_threads(1)`
  means one thread for both. Unless NUMBA_THREADING_LAYER is set, numba uses its 'workqueue'
  layer: its threads sleep between calls (they do not spin against torch's OpenMP threads), and
  unlike GNU OpenMP it survives fork (DataLoader workers). One thread, or an input below
  PARALLEL_MIN_ELEMENTS, runs each kernel's serial variant in the calling thread (no hand-off).
- float16 / bfloat16 are upcast to float32 around the kernels (torch's conversion, one extra
  pass each way) and the result cast back; statistics are float32.
- Compilation is cached (numba cache=True): in the package's __pycache__, else numba's user-wide
  cache directory (~/.cache/numba, or NUMBA_CACHE_DIR when set), else not at all.
"""

import os
import threading

import numpy as np
import torch
from torch import Tensor

from batchnorm.kernels.composite import stat_dtype

try:
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    from batchnorm.kernels import _numba_kernels as _nk
except ImportError:  # numba not installed: available() says so and the fallback serves
    numba = None
    _nk = None

DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
_NATIVE = {torch.float32, torch.float64}  # the dtypes numba loads directly
TASKS_PER_THREAD = 8  # work items per thread: balance when the other core is busy
PARALLEL_MIN_ELEMENTS = 1 << 16  # below this, waking numba's threads costs more than it saves
# numba's workqueue layer aborts the process when two Python threads launch parallel kernels at
# once; threaded launches are serialized (serial variants release the GIL and run concurrently).
_PARALLEL_LOCK = threading.Lock()


def available() -> bool:
    """True when numba is importable (the kernels compile on first use)."""
    return _nk is not None


# ---------------------------------------------------------------------------------------------
# torch <-> numpy plumbing
# ---------------------------------------------------------------------------------------------


def _threads(numel: int) -> int:
    """Threads for a kernel over numel elements: torch's count, 1 for small inputs.

    numba's thread count follows torch's (capped by NUMBA_NUM_THREADS), so the two pools never add
    up to more than asked; torch.set_num_threads(1) means one thread for both.
    """
    wanted = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if wanted <= 1 or numel < PARALLEL_MIN_ELEMENTS:
        return 1
    if numba.get_num_threads() != wanted:  # numba's count is per calling thread
        numba.set_num_threads(wanted)
    return wanted


class _Layout:
    """How the kernels see a tensor shaped like `input`: 'ncs' (N, C, S) or 'mc' (M, C)."""

    def __init__(self, input: Tensor):
        N, C = input.shape[0], input.shape[1]
        S = input.numel() // max(N * C, 1)
        if input.dim() > 2 and S > 1 and C > 1 and not input.is_contiguous():
            self.kind, self.shape = "mc", (N * S, C)  # channels_last(_3d): (N, *spatial, C)
        elif S > 1:
            self.kind, self.shape = "ncs", (N, C, S)
        else:
            self.kind, self.shape = "mc", (N, C)  # (N, C) or spatial 1x1: channels innermost
        threads = _threads(input.numel())
        self.variant = 1 if threads == 1 else 0  # index into each kernel's (parallel, serial)
        if self.kind == "ncs":
            self.split = _nk.ncs_pieces(N, C, S, TASKS_PER_THREAD * threads)
        else:
            self.split = _nk.mc_rows(self.shape[0], C, TASKS_PER_THREAD * threads)

    def run(self, kernel, *args) -> None:
        """Call the chosen variant; threaded launches one at a time (see _PARALLEL_LOCK)."""
        if self.variant == 1:
            kernel(*args)
        else:
            with _PARALLEL_LOCK:
                kernel(*args)

    def array(self, t: Tensor) -> np.ndarray:
        """t as the kernels' numpy view; copies only when t is not in input's layout.

        Reshaped by numpy (well under a microsecond) rather than torch (a few per call).
        """
        a = t.detach().numpy()
        if self.kind == "ncs":
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            return a.reshape(self.shape)
        a = np.moveaxis(a, 1, -1)  # (N, *spatial, C): contiguous for channels-last input
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        return a.reshape(self.shape)


def _dense(t: Tensor) -> Tensor:
    """t when contiguous or channels-last; else a contiguous copy (ops.py never sends one)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) or (
            t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)):
        return t
    return t.contiguous()


def _empty_like(input: Tensor) -> Tensor:
    """torch.empty_like(input) (same strides); large ones numpy-allocated on huge pages.

    Below NUMPY_ALLOC_BYTES torch's allocator serves (glibc reuses its heap). Above, a fresh
    output is page-faulted in 4 KiB pages by torch (3,100 faults for 12.8 MB) but in 2 MiB pages
    by numpy, which madvises huge pages for large arrays; starting the buffer on a 2 MiB boundary
    makes every page of it eligible (70 faults).
    """
    nbytes = input.numel() * input.element_size()
    if nbytes < NUMPY_ALLOC_BYTES:
        return torch.empty_like(input)
    raw = np.empty(nbytes + _HUGE_PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % _HUGE_PAGE
    buffer = torch.from_numpy(raw[start:start + nbytes]).view(input.dtype)
    return buffer.as_strided(input.shape, input.stride())


_HUGE_PAGE = 2 << 20
NUMPY_ALLOC_BYTES = 4 << 20  # numpy asks for huge pages from 4 MiB on
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _vector(t: Tensor | None, C: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel tensor (or `fill` when None) as a contiguous numpy vector of `dtype`."""
    if t is None:
        return np.full(C, fill, dtype=_NUMPY[dtype])
    if t.dtype != dtype:
        t = t.to(dtype)
    return np.ascontiguousarray(t.detach().numpy())


def _upcast(*tensors: Tensor | None) -> list[Tensor | None]:
    """float16 / bfloat16 -> float32 (numba cannot load them); other tensors unchanged."""
    return [None if t is None else _dense(t.float() if t.dtype not in _NATIVE else t)
            for t in tensors]


# ---------------------------------------------------------------------------------------------
# The four primitives
# ---------------------------------------------------------------------------------------------


def stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((x - mean)^2): one pass, shifted sums (see _numba_kernels)."""
    (x,) = _upcast(input)
    C, acc = x.shape[1], stat_dtype(x.dtype)
    mean, m2 = torch.empty(C, dtype=acc), torch.empty(C, dtype=acc)
    if x.numel() == 0:
        return mean.fill_(float("nan")), m2.fill_(0.0)
    layout = _Layout(x)
    zero = _NUMPY[x.dtype](0)
    kernel = (_nk.stats_ncs if layout.kind == "ncs" else _nk.stats_mc)[layout.variant]
    layout.run(kernel, layout.array(x), layout.split, zero, mean.numpy(), m2.numpy())
    return mean, m2


def elemt(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, then + residual, then ReLU, each if asked."""
    x, res = _upcast(input, residual)
    if res is not None and res.dtype != x.dtype:
        res = res.to(x.dtype)
    C, acc = x.shape[1], invstd.dtype
    out = _empty_like(x)
    if x.numel() > 0:
        layout = _Layout(x)
        kernel = (_nk.elemt_ncs if layout.kind == "ncs" else _nk.elemt_mc)[layout.variant]
        res_array = layout.array(res) if res is not None else layout.array(x)  # unread if None
        layout.run(kernel, layout.array(x), _vector(mean, C, acc, 0), _vector(invstd, C, acc, 1),
               _vector(weight, C, acc, 1), _vector(bias, C, acc, 0), res_array,
               res is not None, bool(relu), layout.split, _NUMPY[acc](0), layout.array(out))
    return out if out.dtype == input.dtype else out.to(input.dtype)


def backward_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, output: Tensor | None
) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * x_hat) per channel; dy masked by a fused ReLU."""
    dy, x, y = _upcast(grad_out, input, output)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    C, acc = x.shape[1], mean.dtype
    sum_dy, sum_dy_xhat = torch.empty(C, dtype=acc), torch.empty(C, dtype=acc)
    if x.numel() == 0:
        return sum_dy.zero_(), sum_dy_xhat.zero_()
    layout = _Layout(x)
    kernels = _nk.backward_reduce_ncs if layout.kind == "ncs" else _nk.backward_reduce_mc
    kernel = kernels[layout.variant]
    x_array = layout.array(x)
    y_array = layout.array(y.to(x.dtype)) if y is not None else x_array  # unread if None
    layout.run(kernel, layout.array(dy), x_array, _vector(mean, C, x.dtype, 0),
               _vector(invstd, C, acc, 1),
           y_array, y is not None, layout.split, _NUMPY[x.dtype](0), sum_dy.numpy(),
           sum_dy_xhat.numpy())
    return sum_dy, sum_dy_xhat


def backward_elemt(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
    output: Tensor | None,
) -> Tensor:
    """grad_input = (dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight."""
    dy, x, y = _upcast(grad_out, input, output)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    C, acc = x.shape[1], mean.dtype
    out = _empty_like(x)
    if x.numel() > 0:
        layout = _Layout(x)
        kernels = _nk.backward_elemt_ncs if layout.kind == "ncs" else _nk.backward_elemt_mc
        kernel = kernels[layout.variant]
        x_array = layout.array(x)
        y_array = layout.array(y.to(x.dtype)) if y is not None else x_array  # unread if None
        layout.run(kernel, layout.array(dy), x_array, _vector(mean, C, acc, 0),
                   _vector(invstd, C, acc, 1),
               _vector(weight, C, acc, 1), _vector(mean_dy, C, acc, 0),
               _vector(mean_dy_xhat, C, acc, 0), y_array, y is not None, layout.split,
               _NUMPY[acc](0), layout.array(out))
    return out if out.dtype == input.dtype else out.to(input.dtype)
