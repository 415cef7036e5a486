"""CPU backend: the four batch-norm primitives as fused numba kernels (kernels/_numba_kernels.py).

Same functions, arguments and results as kernels/composite.py (the contract). What this file adds
is the plumbing between torch and the kernels:

- Layout. Contiguous (N, C, *) input is read as (N, C, S); channels-last (N, *, C) and (N, C)
  input as (M, C), in place (numpy transpose + reshape: no transposing copy). grad_out, output and
  residual are brought to input's layout (a no-op when they are in it already, as ops.py ensures).
- Allocation. Results of 4 MiB and more are numpy-allocated (np.empty + torch.from_numpy, on a
  2 MiB boundary) with input's strides: numpy asks the kernel for transparent huge pages on
  large arrays (madvise); torch's CPU allocator does not unless THP_MEM_ALLOC_ENABLE=1, and the
  4 KiB page faults of a fresh output cost as much as the kernel writing it (RESULTS.md). Freed
  large buffers are reused (up to POOL_MAX_BYTES held): a fresh page is zeroed by the OS first.
  Small results and per-channel vectors are made by numpy and wrapped (one torch call each).
- Overhead. Per (shape, strides, threads) a cached _Plan says how the kernels view the tensors;
  each tensor becomes a numpy view with one .numpy() call and numpy reshapes.
- Fused training step. forward_train / backward_train (optional in the contract) run the
  statistics and the elementwise pass per channel while its data are in cache, when a channel's
  slab fits FUSED_SLAB_BYTES (see there for the measured thresholds); else the separate kernels.
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
import sys
import threading
from typing import NamedTuple

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
# Below this, waking numba's threads costs more than it saves. Measured at 2 threads (train fwd,
# fwd+bwd; 256x1024, 16x512x7x7, 16x256x14x14 in both layouts): serial below 1M elements was
# 1.1-2.4x faster than threaded with the former threshold of 64K (numba's workers compete with
# torch's OpenMP threads, which spin after each torch op).
PARALLEL_MIN_ELEMENTS = 1 << 20
# numba's workqueue layer aborts the process when two Python threads launch parallel kernels at
# once; threaded launches are serialized (serial variants release the GIL and run concurrently).
_PARALLEL_LOCK = threading.Lock()


def available() -> bool:
    """True when numba is importable (the kernels compile on first use)."""
    return _nk is not None


# ---------------------------------------------------------------------------------------------
# torch <-> numpy plumbing
# ---------------------------------------------------------------------------------------------


_MAX_THREADS = numba.config.NUMBA_NUM_THREADS if numba is not None else 1


def _threads(numel: int) -> int:
    """Threads for a kernel over numel elements: torch's count, 1 for small inputs.

    numba's thread count follows torch's (capped by NUMBA_NUM_THREADS), so the two pools never add
    up to more than asked; torch.set_num_threads(1) means one thread for both.
    """
    wanted = min(torch.get_num_threads(), _MAX_THREADS)
    if wanted <= 1 or numel < PARALLEL_MIN_ELEMENTS:
        return 1
    if numba.get_num_threads() != wanted:  # numba's count is per calling thread
        numba.set_num_threads(wanted)
    return wanted


class _Plan(NamedTuple):
    """How the kernels see tensors shaped and strided like one input; cached per layout.

    kind 'ncs': (N, C, S) C-contiguous; 'mc': (M, C), channels innermost (channels-last input
    read in place through a numpy transpose by `perm`, (N, C) and spatial 1x1 input as is).
    """

    kind: str
    shape: tuple[int, ...]  # the kernels' array shape
    perm: tuple[int, ...] | None  # numpy axes moving C last (channels-last input), else None
    split: int  # piece length ('ncs') or rows per block ('mc')
    variant: int  # index into each kernel's (parallel, serial) pair
    threads: int
    C: int
    count: int  # elements per channel
    plain_strides: bool  # input's strides are the contiguous ones (outputs can be numpy-made)


_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 4096  # distinct (shape, strides, threads) keys kept; cleared when exceeded


def _plan(input: Tensor) -> _Plan:
    """The cached plan for input's shape, strides and the current thread count."""
    numel = input.numel()
    threads = _threads(numel)
    key = (input.shape, input.stride(), threads)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(input, threads)
    return plan


def _make_plan(input: Tensor, threads: int) -> _Plan:
    N, C = input.shape[0], input.shape[1]
    S = input.numel() // max(N * C, 1)
    perm = None
    if input.dim() > 2 and S > 1 and C > 1 and not input.is_contiguous():
        # channels_last(_3d): memory order (N, *spatial, C)
        kind, shape, perm = "mc", (N * S, C), (0, *range(2, input.dim()), 1)
    elif S > 1:
        kind, shape = "ncs", (N, C, S)
    else:
        kind, shape = "mc", (N, C)  # (N, C) or spatial 1x1: channels innermost
    if kind == "ncs":
        split = _nk.ncs_pieces(N, C, S, TASKS_PER_THREAD * threads)
    else:
        split = _nk.mc_rows(shape[0], C, TASKS_PER_THREAD * threads)
    plain = input.stride() == torch.empty(0).new_empty(input.shape).stride()
    return _Plan(kind, shape, perm, split, 1 if threads == 1 else 0, threads, C, N * S, plain)


def _run(plan: _Plan, kernel, *args) -> None:
    """Call the kernel; threaded launches one at a time (see _PARALLEL_LOCK)."""
    if plan.variant == 1:
        kernel(*args)
    else:
        with _PARALLEL_LOCK:
            kernel(*args)


def _array(plan: _Plan, t: Tensor) -> np.ndarray:
    """t as the kernels' C-contiguous numpy view; copies only when t is not in input's layout."""
    a = t.numpy(force=True)  # force: detaches a tensor that requires grad (cheaper than detach())
    if plan.perm is not None:
        a = a.transpose(plan.perm)
    a = a.reshape(plan.shape)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _dense(t: Tensor) -> Tensor:
    """t when contiguous or channels-last; else a contiguous copy (ops.py never sends one)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) or (
            t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)):
        return t
    return t.contiguous()


def _output(plan: _Plan, input: Tensor) -> tuple[Tensor, np.ndarray]:
    """(torch.empty_like(input), its kernel array), made the cheapest way.

    Small contiguous outputs are numpy-allocated and wrapped (np.empty + torch.from_numpy: one
    torch call instead of torch.empty_like + .numpy()); others go through _empty_like.
    """
    if plan.plain_strides and input.numel() * input.element_size() < NUMPY_ALLOC_BYTES:
        a = np.empty(input.shape, dtype=_NUMPY[input.dtype])
        return torch.from_numpy(a), a.reshape(plan.shape)
    out = _empty_like(input)
    return out, _array(plan, out)


def _vectors(count: int, C: int, dtype: torch.dtype) -> list[tuple[Tensor, np.ndarray]]:
    """`count` fresh per-channel results as (tensor, numpy view) pairs, numpy-allocated."""
    pairs = []
    for _ in range(count):
        a = np.empty(C, dtype=_NUMPY[dtype])
        pairs.append((torch.from_numpy(a), a))
    return pairs


def _empty_like(input: Tensor) -> Tensor:
    """torch.empty_like(input) (same strides); large ones numpy-allocated on huge pages.

    Below NUMPY_ALLOC_BYTES torch's allocator serves (glibc reuses its heap). Above, a fresh
    output is page-faulted in 4 KiB pages by torch (3,100 faults for 12.8 MB) but in 2 MiB pages
    by numpy, which madvises huge pages for large arrays; starting the buffer on a 2 MiB boundary
    makes every page of it eligible (70 faults). Even then the kernel zeroes every fresh page
    (51 MB: ~4 ms, a tenth of a training step), so freed large buffers are reused (_large_buffer).
    """
    nbytes = input.numel() * input.element_size()
    if nbytes < NUMPY_ALLOC_BYTES:
        return torch.empty_like(input)
    buffer = torch.from_numpy(_large_buffer(nbytes)).view(input.dtype)
    return buffer.as_strided(input.shape, input.stride())


# Freed large outputs kept for reuse, like torch's CUDA caching allocator: nbytes -> [(raw,
# offset of the 2 MiB boundary)]. A buffer is free when nothing but this pool refers to it: every
# tensor or array made from it holds a reference to `raw` (torch.from_numpy keeps the numpy view,
# whose base is raw). At most POOL_MAX_BYTES are kept (BATCHNORM_CPU_POOL_MB, default 256);
# 0 turns reuse off.
POOL_MAX_BYTES = int(os.environ.get("BATCHNORM_CPU_POOL_MB", "256")) << 20
_POOL: dict[int, list[tuple[np.ndarray, int]]] = {}
_POOL_LOCK = threading.Lock()
_FREE_REFS = 2  # sys.getrefcount(raw) of a free buffer: the pool's entry tuple, the argument


def _free(entry: tuple[np.ndarray, int]) -> bool:
    """Whether nothing outside the pool refers to the buffer (a view's base counts)."""
    return sys.getrefcount(entry[0]) <= _FREE_REFS


def _large_buffer(nbytes: int) -> np.ndarray:
    """nbytes on a 2 MiB boundary: a free pooled buffer, else a fresh one (pooled if room)."""
    with _POOL_LOCK:  # the view is taken under the lock: it marks the buffer as used
        for entry in _POOL.get(nbytes, ()):
            if _free(entry):
                return entry[0][entry[1]:entry[1] + nbytes]
        raw = np.empty(nbytes + _HUGE_PAGE, dtype=np.uint8)
        entry = (raw, -raw.ctypes.data % _HUGE_PAGE)
        held = sum(e[0].nbytes for es in _POOL.values() for e in es)
        if held + raw.nbytes > POOL_MAX_BYTES:  # make room: drop the free buffers of any size
            for size, es in list(_POOL.items()):
                _POOL[size] = [e for e in es if not _free(e)]
            held = sum(e[0].nbytes for es in _POOL.values() for e in es)
        if held + raw.nbytes <= POOL_MAX_BYTES:
            _POOL.setdefault(nbytes, []).append(entry)
        return raw[entry[1]:entry[1] + nbytes]


_HUGE_PAGE = 2 << 20
NUMPY_ALLOC_BYTES = 4 << 20  # numpy asks for huge pages from 4 MiB on
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_ZERO = {torch.float32: np.float32(0), torch.float64: np.float64(0)}
_FILLED: dict[tuple, np.ndarray] = {}  # (C, dtype, fill) -> constant vector (never written)


def _vector(t: Tensor | None, C: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel tensor (or `fill` when None) as a contiguous numpy vector of `dtype`."""
    if t is None:
        key = (C, dtype, fill)
        a = _FILLED.get(key)
        if a is None:
            if len(_FILLED) >= _PLANS_MAX:
                _FILLED.clear()
            a = _FILLED[key] = np.full(C, fill, dtype=_NUMPY[dtype])
        return a
    if t.dtype != dtype:
        t = t.to(dtype)
    a = t.numpy(force=True)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _upcast(*tensors: Tensor | None) -> list[Tensor | None]:
    """float16 / bfloat16 -> float32 (numba cannot load them); other tensors unchanged."""
    return [None if t is None else _dense(t.float() if t.dtype not in _NATIVE else t)
            for t in tensors]


def _native(input: Tensor) -> bool:
    """float32 / float64 in a layout the kernels read in place: no upcast, no copy."""
    return input.dtype in _NATIVE and (
        input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last) or (
            input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d)))


# ---------------------------------------------------------------------------------------------
# The four primitives
# ---------------------------------------------------------------------------------------------


def stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((x - mean)^2): one pass, shifted sums (see _numba_kernels)."""
    x = input if _native(input) else _upcast(input)[0]
    C, acc = x.shape[1], stat_dtype(x.dtype)
    if x.numel() == 0:
        return torch.full((C,), float("nan"), dtype=acc), torch.zeros(C, dtype=acc)
    (mean, mean_array), (m2, m2_array) = _vectors(2, C, acc)
    plan = _plan(x)
    kernel = (_nk.stats_ncs if plan.kind == "ncs" else _nk.stats_mc)[plan.variant]
    _run(plan, kernel, _array(plan, x), plan.split, _ZERO[x.dtype], mean_array, m2_array)
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
    if _native(input) and (residual is None or residual.dtype == input.dtype):
        x, res = input, residual
    else:
        x, res = _upcast(input, residual)
        if res is not None and res.dtype != x.dtype:
            res = res.to(x.dtype)
    C, acc = x.shape[1], invstd.dtype
    if x.numel() == 0:
        out = torch.empty_like(x)
    else:
        plan = _plan(x)
        out, out_array = _output(plan, x)
        kernel = (_nk.elemt_ncs if plan.kind == "ncs" else _nk.elemt_mc)[plan.variant]
        x_array = _array(plan, x)
        res_array = _array(plan, res) if res is not None else x_array  # unread if None
        _run(plan, kernel, x_array, _vector(mean, C, acc, 0), _vector(invstd, C, acc, 1),
             _vector(weight, C, acc, 1), _vector(bias, C, acc, 0), res_array,
             res is not None, bool(relu), plan.split, _ZERO[acc], out_array)
    return out if out.dtype == input.dtype else out.to(input.dtype)


def _backward_inputs(grad_out, input, output):
    """(dy, x, y) in a dtype the kernels load, dy and y in x's dtype."""
    if (_native(input) and grad_out.dtype == input.dtype
            and (output is None or output.dtype == input.dtype)):
        return grad_out, input, output
    dy, x, y = _upcast(grad_out, input, output)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if y is not None and y.dtype != x.dtype:
        y = y.to(x.dtype)
    return dy, x, y


def backward_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, output: Tensor | None
) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * x_hat) per channel; dy masked by a fused ReLU."""
    dy, x, y = _backward_inputs(grad_out, input, output)
    C, acc = x.shape[1], mean.dtype
    if x.numel() == 0:
        return torch.zeros(C, dtype=acc), torch.zeros(C, dtype=acc)
    (sum_dy, sum_dy_array), (sum_dy_xhat, sum_dy_xhat_array) = _vectors(2, C, acc)
    plan = _plan(x)
    kernels = _nk.backward_reduce_ncs if plan.kind == "ncs" else _nk.backward_reduce_mc
    x_array = _array(plan, x)
    y_array = _array(plan, y) if y is not None else x_array  # unread if None
    _run(plan, kernels[plan.variant], _array(plan, dy), x_array, _vector(mean, C, x.dtype, 0),
         _vector(invstd, C, acc, 1), y_array, y is not None, plan.split, _ZERO[x.dtype],
         sum_dy_array, sum_dy_xhat_array)
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
    dy, x, y = _backward_inputs(grad_out, input, output)
    C, acc = x.shape[1], mean.dtype
    if x.numel() == 0:
        out = torch.empty_like(x)
    else:
        plan = _plan(x)
        out, out_array = _output(plan, x)
        kernels = _nk.backward_elemt_ncs if plan.kind == "ncs" else _nk.backward_elemt_mc
        x_array = _array(plan, x)
        y_array = _array(plan, y) if y is not None else x_array  # unread if None
        _run(plan, kernels[plan.variant], _array(plan, dy), x_array, _vector(mean, C, acc, 0),
             _vector(invstd, C, acc, 1), _vector(weight, C, acc, 1), _vector(mean_dy, C, acc, 0),
             _vector(mean_dy_xhat, C, acc, 0), y_array, y is not None, plan.split, _ZERO[acc],
             out_array)
    return out if out.dtype == input.dtype else out.to(input.dtype)


# ---------------------------------------------------------------------------------------------
# The fused single-process training step (optional in the contract: kernels/composite.py)
# ---------------------------------------------------------------------------------------------

# When the fused kernels serve (tests monkeypatch both). Measured at 1 thread on the 2-core EPYC
# (512 KiB L2 per core, 8 MiB L3), fused vs separate kernels, forward / backward:
#   slab 49-196 KiB (16x128x28x28 .. 16x64x56x56)    1.11-1.27x / 1.17-1.26x faster
#   slab 784 KiB (16x64x112x112, 64x64x56x56)        0.94-1.01x / 1.06-1.10x
#   slab 4 MiB (4x8x512x512)                         0.99x / 1.00x
#   rows of 196-784 bytes (7x7, 14x14 maps)           0.79-0.84x / 0.82-0.93x slower
# The gain is smaller than the pass count suggests (3 -> 2 forward): the output's stores still
# read each line first (write-allocate), so the fused forward saves the statistics' read only.
# Short rows lose: one channel's rows are N short runs a whole (C, S) plane apart, which the
# hardware prefetcher follows worse than the separate kernels' sequential sweep.
FUSED_SLAB_BYTES = 2 << 20  # a channel's N * S elements (x; dy and x backward; + output w/ ReLU)
FUSED_MIN_ROW_BYTES = 2048  # contiguous run per (n, c) row: S * itemsize


def _fused(plan: _Plan, slab_bytes: int, itemsize: int) -> bool:
    """Whether the fused kernels serve this input."""
    if plan.kind == "ncs":  # one task per channel: enough channels to keep every thread busy
        # short rows are fine when the whole input fits the budget (cache-resident anyway)
        long_rows = (plan.shape[2] * itemsize >= FUSED_MIN_ROW_BYTES
                     or slab_bytes * plan.C <= FUSED_SLAB_BYTES)
        return (slab_bytes <= FUSED_SLAB_BYTES and long_rows
                and (plan.threads == 1 or plan.C >= 2 * plan.threads))
    # (M, C) and channels-last: the whole array is one serial task
    return plan.variant == 1 and slab_bytes * plan.C <= FUSED_SLAB_BYTES


def forward_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output, mean, m2, invstd): stats, invstd = rsqrt(m2 / count + eps), elemt, fused."""
    if not (_native(input) and (residual is None or residual.dtype == input.dtype)) or (
            input.numel() == 0):
        return _forward_train_separate(input, weight, bias, residual, relu, eps)
    x = input
    plan = _plan(x)
    if not _fused(plan, plan.count * x.element_size(), x.element_size()):
        return _forward_train_separate(input, weight, bias, residual, relu, eps)
    C, acc = plan.C, stat_dtype(x.dtype)
    (mean, mean_array), (m2, m2_array), (invstd, invstd_array) = _vectors(3, C, acc)
    out, out_array = _output(plan, x)
    x_array = _array(plan, x)
    res_array = _array(plan, residual) if residual is not None else x_array  # unread if None
    args = (x_array, _vector(weight, C, acc, 1), _vector(bias, C, acc, 0), res_array,
            residual is not None, bool(relu), float(eps))
    results = (mean_array, m2_array, invstd_array, out_array)
    if plan.kind == "ncs":
        _run(plan, _nk.forward_train_ncs[plan.variant], *args, _ZERO[acc], *results)
    else:
        _nk.forward_train_mc(*args, plan.split, _ZERO[acc], *results)
    return out, mean, m2, invstd


def _forward_train_separate(input, weight, bias, residual, relu, eps):
    """The four-op composition (what ops.py runs without forward_train)."""
    mean, m2 = stats(input)
    invstd = torch.rsqrt(m2 / (input.numel() // input.shape[1]) + eps)
    return elemt(input, mean, invstd, weight, bias, residual, relu), mean, m2, invstd


def backward_train(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    output: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, sum_dy, sum_dy_xhat): backward_reduce, then backward_elemt with
    mean_dy = sum_dy / count and mean_dy_xhat = sum_dy_xhat / count, fused."""
    dy, x, y = _backward_inputs(grad_out, input, output)
    if x is not input or x.numel() == 0:  # upcast (fp16 / bf16) or empty: the separate kernels
        return _backward_train_separate(grad_out, input, mean, invstd, weight, output)
    plan = _plan(x)
    slab = plan.count * x.element_size() * (2 if y is None else 3)  # dy, x (and the output)
    if not _fused(plan, slab, x.element_size()):
        return _backward_train_separate(grad_out, input, mean, invstd, weight, output)
    C, acc = plan.C, mean.dtype
    (sum_dy, sum_dy_array), (sum_dy_xhat, sum_dy_xhat_array) = _vectors(2, C, acc)
    grad_input, grad_input_array = _output(plan, x)
    x_array = _array(plan, x)
    y_array = _array(plan, y) if y is not None else x_array  # unread if None
    args = (_array(plan, dy), x_array, _vector(mean, C, acc, 0), _vector(invstd, C, acc, 1),
            _vector(weight, C, acc, 1), y_array, y is not None)
    results = (grad_input_array, sum_dy_array, sum_dy_xhat_array)
    count = _NUMPY[acc](plan.count)
    if plan.kind == "ncs":
        _run(plan, _nk.backward_train_ncs[plan.variant], *args, _ZERO[acc], count, *results)
    else:
        _nk.backward_train_mc(*args, plan.split, _ZERO[acc], count, *results)
    return grad_input, sum_dy, sum_dy_xhat


def _backward_train_separate(grad_out, input, mean, invstd, weight, output):
    """The two-op composition (what ops.py runs without backward_train)."""
    sum_dy, sum_dy_xhat = backward_reduce(grad_out, input, mean, invstd, output)
    count = input.numel() // input.shape[1]
    grad_input = backward_elemt(grad_out, input, mean, invstd, weight, sum_dy / count,
                                sum_dy_xhat / count, output)
    return grad_input, sum_dy, sum_dy_xhat
