"""Functional batch norm: torch.nn.functional.batch_norm's signature, and THE router.

Every call, from batch_norm or from a module, takes one of four routes (batch_norm_step is the
chain: 1 and 2 first, then 3 or 4 by the backend that serves the input):

    1. transforms  a torch.func transform (grad, vjp, jvp, vmap, jacrev, ...) is active or a tensor
                   carries a forward-mode tangent: torch's batch norm, which has the batching
                   rules and forward-mode formulas our ops lack; the extras composed around it,
                   no NaN/Inf guard (it would read a flag that vmap cannot)
    2. tracing     torch.compile, torch.export or torch.jit.trace records the call (and no
                   SyncBatchNorm): traced.batch_norm, the same semantics in torch operations
    3. ours        a kernel of ours serves the input's device and dtype (kernels.backend_name:
                   "cpu", the C++ kernels, by default on CPU; "composite" or "triton" when
                   selected), a SyncBatchNorm needs its collectives, or the dtypes mix in a way
                   torch's kernels refuse (float32 input, float16 buffers): the batchnorm:: ops
                   (ops.batch_norm_train / ops.batch_norm_eval)
    4. torch       everything else: CUDA by default (cuDNN), CPU without the C++ extension, any
                   other device, BATCHNORM_KERNELS=aten, float32/64 CPU evaluation that records
                   a graph (our eval kernel has no C++ autograd node), and CPU training while
                   compiled autograd is on (it cannot capture our C++ node): torch's kernels,
                   with residual, ReLU, momentum=None and the NaN/Inf guard composed around them

Never slower than torch.nn: route 3 is taken only where our kernel is verified and at least as
fast (benchmarks/RESULTS.md); otherwise torch's kernels serve. A rejected call changes no buffer.
Arguments are checked before any route, except on the common call to kernels that check them
themselves before writing anything (the C++ ones and torch's: sizes, devices and dtypes of the
per-channel tensors): there Python checks only the rest (the rank, eps, more than one value per
channel in training, eval's buffers given), and a kernel's refusal is then named by the checks
one by one (check_arguments' messages).

Extras beyond torch's signature are keyword-only:

    residual=  a tensor shaped like input, added after the affine (ResNet's "BN + add")
    relu=True  ReLU fused into the same pass, forward and backward

Deliberate difference from torch: a training batch whose statistics are not finite (NaN or Inf
in the input) does not update running_mean / running_var; they keep their values, and for
modules num_batches_tracked does not count the batch. On CPU a RuntimeWarning says so; on GPUs
and under torch.compile the skip happens on the device, without a warning (a warning would need a
host synchronisation in every training step). torch would write NaN into the buffers and every
later eval-mode output would be NaN (pytorch#115500).
"""

import math
import os
import sys
import warnings
from types import FrameType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from batchnorm import kernels, ops, traced
from batchnorm.layout import channel_view, memory_format, sizes

if TYPE_CHECKING:
    from batchnorm.distributed import StatsSync

__all__ = ["batch_norm", "batch_norm_step", "check_arguments", "update_running_stats",
           "is_skipped", "warn_skipped"]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Batch normalization over dim 1 of input, as torch.nn.functional.batch_norm.

    training=True normalizes with the batch's statistics and, when running_mean / running_var
    are given, updates them in place: running = (1 - momentum) * running + momentum * batch, with
    the unbiased batch variance. training=False normalizes with running_mean / running_var.
    """
    output, finite = batch_norm_step(input, running_mean, running_var, weight, bias, training,
                                     momentum, eps, residual=residual, relu=relu)
    if finite is not None and finite is not _FINITE and is_skipped(finite):
        warn_skipped("batch_norm")
    return output


def batch_norm_step(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    residual: Tensor | None = None,
    relu: bool = False,
    num_batches_tracked: Tensor | None = None,
    sync: "StatsSync | None" = None,
) -> tuple[Tensor, Tensor | None]:
    """The router (the module docstring lists its routes): batch_norm for modules, with
    momentum=None (the cumulative average over num_batches_tracked), the num_batches_tracked
    count, and a SyncBatchNorm's StatsSync.

    Returns (output, finite): finite is a 0-dim bool tensor when a training step had running
    buffers to update (False: the batch's statistics were not finite and nothing was updated,
    num_batches_tracked included; the caller warns or counts, see is_skipped), else None.
    """
    # The arguments: on the common call to kernels that check sizes, devices and dtypes
    # themselves (before writing anything), only the rest; a refusal is then named below.
    backend = kernels.backend_name(input) if isinstance(input, Tensor) else ""
    recording = traced.tracing()  # route 2's test, once
    sizes_checked_below = backend in _CHECKING_BACKENDS
    checked_below = (sizes_checked_below and residual is None and sync is None
                     and not recording)  # jit.trace: sizes are traced tensors (_plainly_valid)
    local_batch_stats = training and sync is None
    if not (_checked_below_valid(input, running_mean, running_var, training, eps) if checked_below
            else _plainly_valid(input, running_mean, running_var, weight, bias, residual,
                                local_batch_stats, eps, training, sizes_checked_below)):
        _reject(input, running_mean, running_var, weight, bias, residual, local_batch_stats,
                eps, training)  # raises, or returns for a valid call of an unusual kind
        if input.dim() < 2:  # the empty 1-D input torch takes: an empty output
            return input.clone(), None
    try:  # the chain of routes, in order
        if sync is None:
            if ((_interpreter_stack() is not None or _forward_ad._current_level >= 0)
                    and _transformed(input, weight, bias, residual, running_mean, running_var)):
                return _torch_kernels(input, running_mean, running_var, weight, bias,  # 1
                                      training, momentum, eps, residual, relu,
                                      num_batches_tracked, guard=False)
            if recording:  # 2
                return traced.batch_norm(input, running_mean, running_var, weight, bias, training,
                                         momentum, eps, residual=residual, relu=relu,
                                         num_batches_tracked=num_batches_tracked), None
            # As torch: empty output, buffers untouched, the batch still counted. Not with a
            # StatsSync: an empty rank still takes part in both collectives (count 0), or the
            # other ranks deadlock.
            if input.numel() == 0:
                if training and num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
                return _empty_batch(input, weight, bias), None
            if (backend == "cpu" and not training and input.dtype in _TORCH_EVAL_GRAD_DTYPES
                    and _records_graph(input, weight, bias, residual)):
                backend = "aten"  # torch's kernel and C++ node beat elemt's autograd formula
            if backend == "cpu" and training and _compiled_autograd():
                backend = "aten"  # compiled autograd captures torch's nodes, not our C++ one
            if backend == "aten":  # 4
                try:
                    return _torch_kernels(input, running_mean, running_var, weight, bias,
                                          training, momentum, eps, residual, relu,
                                          num_batches_tracked, guard=True)
                except RuntimeError:
                    if _torch_takes(input, running_mean, running_var, weight, bias):
                        raise
                backend = "composite"  # a dtype mix torch's kernels refuse: ours take any mix
        return _our_kernels(input, running_mean, running_var, weight, bias, training,  # 3
                            momentum, eps, residual, relu, num_batches_tracked, sync,
                            backend == "cpu")
    except RuntimeError as failed:  # NotImplementedError too (a kernel's dtype refusal)
        if not sizes_checked_below:
            raise
        error = failed  # a kernel refused an argument: say which, as check_arguments would
    _reject(input, running_mean, running_var, weight, bias, residual, local_batch_stats, eps,
            training)
    raise error


_interpreter_stack = torch._C._functorch.peek_interpreter_stack  # a torch.func transform's
_forward_ad = torch.autograd.forward_ad  # _current_level >= 0: forward-mode AD is active


# ---------------------------------------------------------------------------------------------
# Route 1: under torch.func transforms and forward-mode AD
# ---------------------------------------------------------------------------------------------


def _transformed(*tensors: Tensor | None) -> bool:
    """True under a torch.func transform (grad, vmap, jvp, jacrev, ...) or when a tensor carries
    a forward-mode tangent (torch.autograd.forward_ad): our ops have no batching rules and no
    forward-mode formulas, so such calls take torch's batch norm, which has both."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return not torch.compiler.is_compiling()
    if torch.autograd.forward_ad._current_level >= 0:
        unpack = torch.autograd.forward_ad.unpack_dual
        return any(t is not None and unpack(t).tangent is not None for t in tensors)
    return False


# Where torch's eval-mode gradients are as accurate as ours (float16 / bfloat16: its weight
# gradient is off by up to 20% in bfloat16, measured against float64; ours sums in float32).
_TORCH_EVAL_GRAD_DTYPES = (torch.float32, torch.float64)


def _torch_takes(input: Tensor, *vectors: Tensor | None) -> bool:
    """Whether torch's kernels take these dtypes: per-channel tensors of the input's dtype, or
    float32 ones with a float16 / bfloat16 input (not the reverse)."""
    dtype = input.dtype
    for v in vectors:
        if v is not None and v.dtype != dtype and not (v.dtype == torch.float32
                                                       and dtype in _HALF):
            return False
    return True


_HALF = (torch.float16, torch.bfloat16)


def _compiled_autograd() -> bool:
    """Whether compiled autograd (torch._dynamo.compiled_autograd) is on for this thread's
    backward passes: it captures torch's autograd nodes, and has no form for our C++ node."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return module is not None and bool(module.compiled_autograd_enabled)


def _records_graph(*tensors: Tensor | None) -> bool:
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Route 3: our kernels, through the batchnorm:: ops
# ---------------------------------------------------------------------------------------------


def _our_kernels(input, running_mean, running_var, weight, bias, training, momentum, eps,
                 residual, relu, num_batches_tracked, sync, node):
    """The ops (node: the C++ autograd node serves the training step, see ops.batch_norm_train)."""
    if not input.is_contiguous():  # channels_last stays so; any other stride is made dense
        input = input.contiguous(memory_format=memory_format(input))
    if residual is not None:
        residual = residual.contiguous(memory_format=memory_format(input))
    if not training:
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps,
                                   residual, relu), None
    if node and sync is None:
        output, finite = ops.batch_norm_train_step(input, weight, bias, eps, residual, relu,
                                                   running_mean, running_var,
                                                   num_batches_tracked, momentum)
        if running_mean is None:
            return output, None
        if finite is True:  # the flag read in C++: the shared flags, which is_skipped reads free
            return output, _FINITE
        return output, (_NOT_FINITE if finite is False else finite)
    output, _, _, finite = ops.batch_norm_train(input, weight, bias, eps, residual, relu, sync,
                                                running_mean, running_var, num_batches_tracked,
                                                momentum, node=node)
    return output, (None if running_mean is None else finite)


# ---------------------------------------------------------------------------------------------
# Routes 1 and 4: torch's own kernels, our extras composed around them
# ---------------------------------------------------------------------------------------------

_FINITE, _NOT_FINITE = torch.tensor(True), torch.tensor(False)  # the CPU flags (never written)


def _torch_kernels(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   residual, relu, num_batches_tracked, guard):
    """torch.batch_norm (the op under torch.nn.functional.batch_norm: cuDNN on CUDA), then the
    residual and the ReLU; momentum=None as torch.nn's modules turn it into a factor, 1 /
    num_batches_tracked. guard: the NaN/Inf guard (route 4; a transform cannot read its flag)."""
    if momentum is not None:
        factor = momentum
    elif training and num_batches_tracked is not None:
        factor = 1.0 / (float(num_batches_tracked) + 1)  # this batch counted
    else:
        factor = 0.0
    old = None  # both buffers before the update, in one copy, while the guard may need them
    if guard and training and running_mean is not None and running_var is not None:
        old = torch.cat((running_mean, running_var))
    # Counted before torch's call, as torch.nn's layer counts: checkpoint's recomputation can
    # stop inside the call. (The guard without a host read counts after it, from its flag.)
    counted = training and num_batches_tracked is not None and (old is None or old.is_cpu)
    if counted:
        num_batches_tracked.add_(1)
    try:
        output = torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                                  factor, eps, input.is_cuda and torch.backends.cudnn.enabled)
    except RuntimeError:  # a rejected call changes nothing
        if old is not None:  # torch can refuse after its update (a weight on another device)
            _restore(running_mean, running_var, old)
        if counted:
            num_batches_tracked.sub_(1)
        raise
    finite = None
    if old is not None:
        finite = _keep_if_finite(running_mean, running_var, num_batches_tracked, old)
    if residual is not None:  # in place only where output + residual would keep its strides
        in_place = guard and residual.stride() == output.stride()  # (cuDNN's eval output can be
        output = output.add_(residual) if in_place else output + residual  # NCHW on NHWC input)
    if relu:
        output = torch.relu(output) if not guard else torch.relu_(output)
    return output, finite


def _keep_if_finite(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
                    old: Tensor) -> Tensor:
    """The NaN/Inf guard after torch's update: the old buffers back, and the batch not counted,
    when the batch's statistics were not finite (on CPU it was counted before torch's call; on a
    device the kept batch is counted here). A NaN or Inf in a channel's input makes its variance
    NaN (an overflow makes it Inf), and torch's update carries that into running_var even at
    momentum 0, so running_var is the one thing to check. old: both buffers before the update,
    concatenated. (Measured on CPU, in a training loop: this cat and max().item() are the
    cheapest pair; NumPy views, clones and tolist() cost as much or more.)"""
    if not running_var.is_cpu:
        return _keep_if_finite_on_device(running_mean, running_var, num_batches_tracked, old)
    if _isfinite(running_var.max().item()):  # max: no overflow, NaN propagates; the read is free
        return _FINITE
    _restore(running_mean, running_var, old)
    if num_batches_tracked is not None:
        num_batches_tracked.sub_(1)
    return _NOT_FINITE


def _keep_if_finite_on_device(running_mean: Tensor, running_var: Tensor,
                              num_batches_tracked: Tensor | None, old: Tensor) -> Tensor:
    """_keep_if_finite without a host synchronisation (a GPU's): the flag stays on the device and
    selects. With the cat before torch's call, six small kernels, one of which (the count)
    torch.nn's step has too (was eleven: copy_ of a where, and the count's add and subtract)."""
    old_mean, old_var = old.split((running_mean.numel(), running_var.numel()))  # views
    finite = torch.isfinite(running_var).all()
    for buffer, before in ((running_mean, old_mean), (running_var, old_var)):  # (cat promoted
        before = before.to(buffer.dtype)  # buffers of two dtypes; else no copy)
        torch.where(finite, buffer, before, out=_unrecorded(buffer))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite)  # counted when kept
    return finite


_isfinite = math.isfinite


def _restore(running_mean: Tensor, running_var: Tensor, old: Tensor) -> None:
    old_mean, old_var = old.split((running_mean.numel(), running_var.numel()))
    _unrecorded(running_mean).copy_(old_mean)
    _unrecorded(running_var).copy_(old_var)


def _unrecorded(buffer: Tensor) -> Tensor:
    """The buffer's memory with a version counter of its own: torch's batch-norm autograd nodes
    save running_mean and running_var (a training backward never reads them), so a write the
    guard makes after the forward must not bump their version, or backward raises "modified by
    an inplace operation" (seen on CUDA, where the guard writes every step)."""
    return buffer.data


# ---------------------------------------------------------------------------------------------
# Shared by the family (ghost batch norm, batch renormalization)
# ---------------------------------------------------------------------------------------------


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None,
                         num_batches_tracked: Tensor | None, mean: Tensor, m2: Tensor,
                         count: int | Tensor, momentum: float | None) -> Tensor:
    """The running-statistics update of one batch of count values per channel (mean and M2 =
    sum of squared deviations per channel), with its NaN/Inf guard; returns `finite`. Without
    buffers the batch is only counted, as torch counts it."""
    running = ops.RunningStats(running_mean, running_var, num_batches_tracked, momentum)
    return ops.update_running(running, mean, m2, count)


_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside torch and this package: the user's line."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level - 1


def is_skipped(finite: Tensor) -> bool:
    """Whether a training step's flag says its batch was skipped (non-finite statistics), where
    reading the flag is free: on CPU, outside tracing. Elsewhere it reads False (a host
    synchronisation every step would cost more than the warning is worth)."""
    if finite is _FINITE:  # torch's kernels on CPU, a finite batch: the common case, no read
        return False
    return finite.is_cpu and not torch.compiler.is_compiling() and not finite.item()


def warn_skipped(where: str) -> None:
    """The RuntimeWarning for a skipped training batch, pointing at the caller's line; `where`
    names the call or the layer."""
    warnings.warn(
        f"{where}: this training batch has non-finite statistics (NaN or Inf in the input); "
        f"running_mean, running_var and num_batches_tracked were left unchanged",
        RuntimeWarning,
        stacklevel=_caller_stacklevel(),
    )


def _empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """An empty batch gives an empty output that still depends on weight and bias (zero grads)."""
    shape = channel_view(input)
    output = input.clone()
    if weight is not None:
        output = output * weight.view(shape)
    if bias is not None:
        output = output + bias.view(shape)
    return output.to(input.dtype)


_CHECKING_BACKENDS = ("cpu", "aten")  # kernels that check sizes and devices before any write


def check_arguments(input, running_mean, running_var, weight, bias, residual, local_batch_stats,
                    eps, training=None, sizes_checked_below=False):
    """Every rejection happens here, before any buffer is touched: what torch rejects, with
    torch's exception types (eps must be positive in training and non-negative in eval; any
    float momentum is taken, as torch takes it).

    local_batch_stats: the batch statistics are this call's own (training without a StatsSync),
    so they need more than one value per channel. training: whether the call normalizes with
    batch statistics at all (default: local_batch_stats; True for SyncBatchNorm and ghost batch
    norm, whose statistics are not the whole local batch's).

    Every call pays for the check, so the common valid call is recognised in one pass
    (_plainly_valid); anything else goes through the checks one by one, which name the problem.
    sizes_checked_below: the kernels the call reaches (the C++ ones, torch's) check the sizes and
    devices of running_mean, running_var, weight and bias themselves, before writing anything,
    so the common call skips those here.
    """
    training = local_batch_stats if training is None else training
    if not _plainly_valid(input, running_mean, running_var, weight, bias, residual,
                          local_batch_stats, eps, training, sizes_checked_below):
        _reject(input, running_mean, running_var, weight, bias, residual, local_batch_stats, eps,
                training)


def _checked_below_valid(input, running_mean, running_var, training, eps) -> bool:
    """_plainly_valid for a call whose kernels (the C++ ones, torch's) check the sizes, devices
    and dtypes of input, running_mean, running_var, weight and bias before writing anything: only
    what they do not check (False may still be valid: an empty input)."""
    if input.dim() < 2 or (running_mean is None) != (running_var is None):
        return False
    if training:
        return eps > 0 and input.numel() != input.shape[1]  # 1 value per channel: no variance
    return eps >= 0 and running_mean is not None


def _plainly_valid(input, running_mean, running_var, weight, bias, residual, local_batch_stats,
                   eps, training, sizes_checked_below) -> bool:
    """True for a call every check below passes (False may still pass them: an empty input)."""
    if not isinstance(input, Tensor) or not input.is_floating_point() or input.dim() < 2:
        return False
    if not (eps > 0 if training else eps >= 0):  # a NaN eps fails both
        return False
    if (running_mean is None) != (running_var is None):  # both or neither
        return False
    if not training and running_mean is None:  # eval normalizes with them
        return False
    shape, device = sizes(input), input.device  # ints, also under torch.jit.trace
    channels = shape[1]
    for vector in (running_mean, running_var, weight, bias):
        if vector is not None and (not vector.is_floating_point() or not sizes_checked_below and (
                vector.numel() != channels or vector.device != device)):
            return False
    if residual is not None and (sizes(residual) != shape or residual.device != device):
        return False
    return not local_batch_stats or shape.numel() != channels  # numel == C: 1 value per channel


def _reject(input, running_mean, running_var, weight, bias, residual, local_batch_stats, eps,
            training) -> None:
    """The checks one by one: raises the first problem found, or returns (a valid call)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm expects input to be a Tensor, got {type(input).__name__}")
    if not (input.is_floating_point()):
        raise NotImplementedError(
            f"batch_norm expects a floating-point input (float16, bfloat16, float32, float64), "
            f"got dtype {input.dtype}"
        )
    shape = sizes(input)  # ints, also under torch.jit.trace
    if input.dim() < 2 and shape.numel() > 0:  # torch takes an empty 1-D input, (0,)
        raise ValueError(
            f"batch_norm expects an input of at least 2 dimensions (N, C, *), got "
            f"{input.dim()}D input of shape {tuple(shape)}"
        )
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training (it keeps the batch "
                         f"variance away from 0), but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.dim() < 2:
        return
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(
            "batch_norm in evaluation mode (training=False) normalizes with running_mean and "
            "running_var, but they were not given; pass them or use training=True"
        )
    if (running_mean is None) != (running_var is None):  # torch's ValueError
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"batch_norm updates running_mean and running_var together: {given} "
                         f"was given without {missing}; pass both or neither")
    channels = shape[1]
    vectors = (("running_mean", running_mean), ("running_var", running_var),
               ("weight", weight), ("bias", bias))
    for name, tensor in (*vectors, ("residual", residual)):
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(f"batch_norm: {name} is on {tensor.device}, expected "
                               f"{input.device} like the input: every tensor argument must be on "
                               f"the input's device")
    if residual is not None and sizes(residual) != shape:
        raise RuntimeError(
            f"batch_norm: residual must have the input's shape {tuple(shape)}, got "
            f"{tuple(sizes(residual))}"
        )
    for name, tensor in vectors:
        if tensor is None:
            continue
        if sizes(tensor).numel() != channels:  # any shape of C values, as torch takes them
            raise RuntimeError(
                f"batch_norm: {name} should hold one value per channel "
                f"({channels} for input of shape {tuple(shape)}), got shape "
                f"{tuple(sizes(tensor))}"
            )
        if not tensor.is_floating_point():
            raise RuntimeError(f"batch_norm: {name} must be floating point, got {tensor.dtype}")
    if local_batch_stats and shape.numel() > 0:
        values_per_channel = shape.numel() // channels
        if values_per_channel <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{shape}"
            )
