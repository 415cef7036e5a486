"""The batchnorm:: ops: schemas (defined here, once), fake implementations, autograd formulas,
and the compositions that modules and functional.py call.

    primitives (SyncBatchNorm, double backward, the family)
    batchnorm::stats            (input) -> (mean, m2)
    batchnorm::elemt            (input, mean, invstd, weight?, bias?, residual?, relu) -> output
    batchnorm::backward_reduce  (grad_out, input, mean, invstd, output?) -> (sum_dy, sum_dy_xhat)
    batchnorm::backward_elemt   (grad_out, input, mean, invstd, weight?, mean_dy, mean_dy_xhat,
                                 output?) -> grad_input
    fused single-process steps
    batchnorm::forward_train    (input, weight?, bias?, residual?, relu, eps, running_mean(a!)?,
                                 running_var(b!)?, num_batches_tracked(c!)?, momentum?)
                                -> (output, mean, m2, invstd, finite)
    batchnorm::backward_train   (grad_out, input, mean, invstd, weight?, output?)
                                -> (grad_input, sum_dy, sum_dy_xhat)
    batchnorm::forward_eval     (input, running_mean, running_var, weight?, bias?, residual?, relu,
                                 eps) -> output
    batchnorm::update_running_stats (running_mean(a!), running_var(b!), num_batches_tracked(c!)?,
                                 mean, m2, count, momentum?) -> finite

kernels/composite.py states the semantics. Each device's kernels are registered for its dispatch
key (kernels/__init__.py): CPU the C++ extension, CUDA Triton (when selected), every other device
(and CPU without the extension) the composite in torch operations. functional.py's router sends a
call here only where such a kernel of ours serves it (route 3); torch's own kernels serve the
rest.

The primitives have fake implementations and autograd formulas written with the other ops, so
they are differentiable any number of times (gradgradcheck). The fused training step has one
autograd formula per backend: the C++ node registered for AutogradCPU with the C++ kernels
(kernels/cpu/autograd.cpp), and _BatchNormTrain below for every other backend and SyncBatchNorm.

forward_train updates the running statistics in place: running = running + factor * (batch -
running), factor = momentum, or 1 / num_batches_tracked when momentum is None (cumulative), with
the unbiased batch variance; a batch whose statistics are not finite (NaN or Inf in the input)
updates nothing and returns finite = False. update_running_stats is the same update on its own,
for SyncBatchNorm, ghost batch norm and batch renormalization.
"""

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.kernels import cpu as _cpu
from batchnorm.layout import (
    channel_view,
    memory_format,
    reduce_dims,
    relu_masked,
    stat_dtype,
    values_per_channel,
)

if TYPE_CHECKING:
    from batchnorm.distributed import StatsSync

_lib = torch.library.Library("batchnorm", "DEF")

SCHEMAS = {
    "stats": "(Tensor input) -> (Tensor mean, Tensor m2)",
    "elemt": "(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
             "Tensor? residual, bool relu) -> Tensor",
    "backward_reduce": "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
                       "Tensor? output) -> (Tensor sum_dy, Tensor sum_dy_xhat)",
    "backward_elemt": "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
                      "Tensor? weight, Tensor mean_dy, Tensor mean_dy_xhat, Tensor? output) "
                      "-> Tensor",
    "forward_train": "(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, bool relu, "
                     "float eps, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
                     "Tensor(c!)? num_batches_tracked, float? momentum) "
                     "-> (Tensor output, Tensor mean, Tensor m2, Tensor invstd, Tensor finite)",
    "backward_train": "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
                      "Tensor? weight, Tensor? output) "
                      "-> (Tensor grad_input, Tensor sum_dy, Tensor sum_dy_xhat)",
    "forward_eval": "(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
                    "Tensor? bias, Tensor? residual, bool relu, float eps) -> Tensor",
    "update_running_stats": "(Tensor(a!) running_mean, Tensor(b!) running_var, "
                            "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor m2, "
                            "Tensor count, float? momentum) -> Tensor finite",
}
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)
kernels.register(_lib, tuple(SCHEMAS))

stats = torch.ops.batchnorm.stats.default
elemt = torch.ops.batchnorm.elemt.default
backward_reduce = torch.ops.batchnorm.backward_reduce.default
backward_elemt = torch.ops.batchnorm.backward_elemt.default
forward_train = torch.ops.batchnorm.forward_train.default
backward_train = torch.ops.batchnorm.backward_train.default
forward_eval = torch.ops.batchnorm.forward_eval.default
update_running_stats = torch.ops.batchnorm.update_running_stats.default


def _vector(input: Tensor) -> Tensor:
    return input.new_empty(input.shape[1], dtype=stat_dtype(input.dtype))


def _same_device(op: str, input: Tensor, *others: Tensor | None) -> None:
    """The device kernels check their own arguments; a meta (or fake) input must not quietly
    accept arguments from another device either (the dispatcher picks Meta for a mix)."""
    for other in others:
        if other is not None and other.device != input.device:
            raise RuntimeError(f"batchnorm::{op}: a tensor argument is on {other.device}, "
                               f"expected {input.device} like the input: every tensor argument "
                               f"must be on the input's device")


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile and FakeTensor
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake("batchnorm::stats")
def _(input):
    return _vector(input), _vector(input)


@torch.library.register_fake("batchnorm::elemt")
def _(input, mean, invstd, weight, bias, residual, relu):
    _same_device("elemt", input, mean, invstd, weight, bias, residual)
    return torch.empty_like(input)


@torch.library.register_fake("batchnorm::backward_reduce")
def _(grad_out, input, mean, invstd, output):
    _same_device("backward_reduce", input, grad_out, mean, invstd, output)
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("batchnorm::backward_elemt")
def _(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xhat, output):
    _same_device("backward_elemt", input, grad_out,
                 mean, invstd, weight, mean_dy, mean_dy_xhat, output)
    return torch.empty_like(input)


@torch.library.register_fake("batchnorm::forward_train")
def _(input, weight, bias, residual, relu, eps, running_mean, running_var, num_batches_tracked,
      momentum):
    _same_device("forward_train", input, weight,
                 bias, residual, running_mean, running_var, num_batches_tracked)
    finite = input.new_empty((), dtype=torch.bool)
    return torch.empty_like(input), _vector(input), _vector(input), _vector(input), finite


@torch.library.register_fake("batchnorm::backward_train")
def _(grad_out, input, mean, invstd, weight, output):
    _same_device("backward_train", input, grad_out, mean, invstd, weight, output)
    return torch.empty_like(input), torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("batchnorm::forward_eval")
def _(input, running_mean, running_var, weight, bias, residual, relu, eps):
    _same_device("forward_eval", input, running_mean, running_var, weight, bias, residual)
    return torch.empty_like(input)


@torch.library.register_fake("batchnorm::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, mean, m2, count, momentum):
    _same_device("update_running_stats", mean, running_mean,
                 running_var, num_batches_tracked, m2, count)
    return mean.new_empty((), dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Autograd formulas of the primitives
# ---------------------------------------------------------------------------------------------


def _stats_setup(ctx, inputs, output):
    (input,) = inputs
    mean, _ = output
    ctx.save_for_backward(input, mean)


def _stats_backward(ctx, grad_mean, grad_m2):
    # d mean / dx = 1 / count;  d M2 / dx = 2 (x - mean)  (the sum of the deviations is zero)
    input, mean = ctx.saved_tensors
    shape = channel_view(input)
    grad = torch.zeros_like(input, dtype=mean.dtype)
    if grad_mean is not None:
        grad = grad + (grad_mean / values_per_channel(input)).view(shape)
    if grad_m2 is not None:
        grad = grad + 2 * grad_m2.view(shape) * (input.to(mean.dtype) - mean.view(shape))
    return grad.to(input.dtype)


torch.library.register_autograd("batchnorm::stats", _stats_backward, setup_context=_stats_setup)


def _elemt_setup(ctx, inputs, output):
    input, mean, invstd, weight, bias, residual, relu = inputs
    ctx.relu = relu
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(input, mean, invstd, weight, output if relu else None)


def _elemt_backward(ctx, grad_out):
    # With mean and invstd held constant, every gradient follows from the two sums of
    # backward_reduce:  d weight = sum(dy x_hat),  d bias = sum(dy),
    #   d mean = -invstd weight sum(dy),
    #   d invstd = weight sum(dy (x - mean)) = weight sum(dy x_hat) / invstd
    input, mean, invstd, weight, output = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_out = grad_out.contiguous(memory_format=memory_format(input))
    sum_dy, sum_dy_xhat = backward_reduce(grad_out, input, mean, invstd, output)
    w = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    grad_input = grad_mean = grad_invstd = grad_weight = grad_bias = grad_residual = None
    if needs[0]:
        zero = torch.zeros_like(mean)
        grad_input = backward_elemt(grad_out, input, mean, invstd, weight, zero, zero, output)
    if needs[1]:
        grad_mean = -invstd * w * sum_dy
    if needs[2]:
        grad_invstd = w * sum_dy_xhat / invstd
    if needs[3]:
        grad_weight = sum_dy_xhat.to(weight.dtype)
    if needs[4]:
        grad_bias = sum_dy.to(ctx.bias_dtype)
    if needs[5]:
        grad_residual = relu_masked(grad_out, output).to(ctx.residual_dtype)
    return grad_input, grad_mean, grad_invstd, grad_weight, grad_bias, grad_residual, None


torch.library.register_autograd("batchnorm::elemt", _elemt_backward, setup_context=_elemt_setup)


def _backward_reduce_setup(ctx, inputs, output):
    grad_out, input, mean, invstd, relu_output = inputs
    ctx.save_for_backward(grad_out, input, mean, invstd, relu_output)


def _backward_reduce_backward(ctx, grad_sum_dy, grad_sum_dy_xhat):
    # sum_dy = sum(m dy),  sum_dy_xhat = sum(m dy (x - mean) invstd),  m = the ReLU mask
    grad_out, input, mean, invstd, relu_output = ctx.saved_tensors
    shape, dims, acc = channel_view(input), reduce_dims(input), mean.dtype
    dy = relu_masked(grad_out, relu_output).to(acc)
    x_mu = input.to(acc) - mean.view(shape)
    x_hat = x_mu * invstd.view(shape)
    if grad_sum_dy is None:
        grad_sum_dy = torch.zeros_like(mean)
    if grad_sum_dy_xhat is None:
        grad_sum_dy_xhat = torch.zeros_like(mean)
    g_sum, g_sdx = grad_sum_dy.view(shape), grad_sum_dy_xhat.view(shape)
    grad_dy = relu_masked(g_sum + g_sdx * x_hat, relu_output).to(grad_out.dtype)
    grad_input = (g_sdx * dy * invstd.view(shape)).to(input.dtype)
    grad_mean = -grad_sum_dy_xhat * invstd * dy.sum(dims)
    grad_invstd = grad_sum_dy_xhat * (dy * x_mu).sum(dims)
    return grad_dy, grad_input, grad_mean, grad_invstd, None


torch.library.register_autograd("batchnorm::backward_reduce", _backward_reduce_backward,
                                setup_context=_backward_reduce_setup)


def _backward_elemt_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_elemt_backward(ctx, grad):
    # dx = (m dy - mean_dy - x_hat mean_dy_xhat) k,  x_hat = (x - mean) invstd,  k = invstd weight
    grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xhat, relu_output = ctx.saved_tensors
    shape, dims, acc = channel_view(input), reduce_dims(input), mean.dtype
    w = torch.ones_like(invstd) if weight is None else weight.to(acc)
    dy = relu_masked(grad_out, relu_output).to(acc)
    x_hat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
    g = grad.to(acc)
    k = (invstd * w).view(shape)
    mdy, mdx = mean_dy.view(shape), mean_dy_xhat.view(shape)
    inner = dy - mdy - x_hat * mdx  # dx / k
    grad_dy = relu_masked(g * k, relu_output).to(grad_out.dtype)
    grad_input = (-g * k * mdx * invstd.view(shape)).to(input.dtype)
    grad_mean = (g * k * mdx).sum(dims) * invstd
    # d/d invstd of (m dy - mean_dy) invstd w - (x - mean) invstd^2 w mean_dy_xhat
    grad_invstd = (g * (dy - mdy - 2 * x_hat * mdx)).sum(dims) * w
    grad_weight = None if weight is None else ((g * inner).sum(dims) * invstd).to(weight.dtype)
    grad_mean_dy = -(g * k).sum(dims)
    grad_mean_dy_xhat = -(g * k * x_hat).sum(dims)
    return (grad_dy, grad_input, grad_mean, grad_invstd, grad_weight, grad_mean_dy,
            grad_mean_dy_xhat, None)


torch.library.register_autograd("batchnorm::backward_elemt", _backward_elemt_backward,
                                setup_context=_backward_elemt_setup)


# ---------------------------------------------------------------------------------------------
# Compositions: training and evaluation batch norm
# ---------------------------------------------------------------------------------------------


class RunningStats(NamedTuple):
    """The buffers a training step updates, and how: momentum, or None for the cumulative
    average over num_batches_tracked."""

    mean: Tensor | None
    var: Tensor | None
    num_batches_tracked: Tensor | None
    momentum: float | None


class _BatchNormTrain(torch.autograd.Function):
    """Single process: forward_train / backward_train, the fused steps.
    With a StatsSync: stats -> combine_stats -> elemt, and backward_reduce -> sum_grads ->
    backward_elemt, then update_running_stats with the global statistics."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, relu, sync, running):
        ctx.set_materialize_grads(False)  # no zero-filled grads for mean, m2, finite
        count = values_per_channel(input)
        if sync is None:
            output, mean, m2, invstd, finite = forward_train(
                input, weight, bias, residual, relu, eps, running.mean, running.var,
                running.num_batches_tracked, running.momentum)
        else:
            mean, m2 = stats(input)
            mean, m2, count = sync.combine_stats(mean, m2, count)
            var = m2 / count  # biased: the normalization uses the batch's own variance
            invstd = torch.rsqrt(var + eps)
            output = elemt(input, mean, invstd, weight, bias, residual, relu)
            finite = update_running(running, mean, m2, count)
        ctx.eps, ctx.sync, ctx.count = eps, sync, count
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, mean, invstd, output if relu else None)
        ctx.mark_non_differentiable(mean, m2, finite)
        return output, mean, m2, finite

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_m2, _grad_finite):
        if grad_out is None:  # only mean, m2 or finite were used: nothing flows back
            return None, None, None, None, None, None, None, None
        input, weight, mean, invstd, relu_output = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format(input))
        if torch.is_grad_enabled():
            # create_graph: mean and invstd depend on input; recompute them through the
            # differentiable ops so that second derivatives see that dependence.
            if ctx.sync is not None:
                raise NotImplementedError("double backward through SyncBatchNorm is not supported")
            mean, m2 = stats(input)
            invstd = torch.rsqrt(m2 / ctx.count + ctx.eps)
        grad_input = None
        if ctx.sync is None and ctx.needs_input_grad[0] and not torch.is_grad_enabled():
            grad_input, sum_dy, sum_dy_xhat = backward_train(grad_out, input, mean, invstd,
                                                             weight, relu_output)
            local_sum_dy, local_sum_dy_xhat = sum_dy, sum_dy_xhat
        else:
            sum_dy, sum_dy_xhat = backward_reduce(grad_out, input, mean, invstd, relu_output)
            local_sum_dy, local_sum_dy_xhat = sum_dy, sum_dy_xhat  # parameter grads: per rank
            if ctx.sync is not None:
                sum_dy, sum_dy_xhat = ctx.sync.sum_grads(sum_dy, sum_dy_xhat)
            if ctx.needs_input_grad[0]:
                grad_input = backward_elemt(grad_out, input, mean, invstd, weight,
                                            sum_dy / ctx.count, sum_dy_xhat / ctx.count,
                                            relu_output)
        grad_weight, grad_bias, grad_residual = _parameter_grads(
            ctx, weight, local_sum_dy, local_sum_dy_xhat, grad_out, relu_output)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None


def _parameter_grads(ctx, weight, sum_dy, sum_dy_xhat, grad_out, relu_output):
    """(d weight, d bias, d residual) of a training batch norm (inputs 1, 2, 3 of its Function):
    d weight = sum(dy x_hat), d bias = sum(dy), d residual = dy through the fused ReLU."""
    needs = ctx.needs_input_grad
    grad_weight = sum_dy_xhat.to(weight.dtype) if needs[1] else None
    grad_bias = sum_dy.to(ctx.bias_dtype) if needs[2] else None
    grad_residual = (relu_masked(grad_out, relu_output)
                     if ctx.has_residual and needs[3] else None)
    return grad_weight, grad_bias, grad_residual


def update_running(running: RunningStats, mean: Tensor, m2: Tensor, count: int | Tensor) -> Tensor:
    """update_running_stats for a batch of count values per channel; returns `finite`. Without
    buffers the batch is only counted, as torch counts it."""
    if running.mean is None or running.var is None:
        if running.num_batches_tracked is not None:
            running.num_batches_tracked.add_(1)
        return torch.isfinite(m2).all() & torch.isfinite(mean).all()
    if not isinstance(count, Tensor):
        count = torch.full((), count, dtype=m2.dtype, device=m2.device)  # no host-to-device copy
    return update_running_stats(running.mean, running.var, running.num_batches_tracked, mean, m2,
                                count, running.momentum)


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = False,
    sync: "StatsSync | None" = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.0,
    *,
    node: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize with the batch's statistics and update the running buffers in place (both or
    neither given; momentum=None: the cumulative average over num_batches_tracked).

    Returns (output, mean, m2, finite): the batch's per-channel mean and M2 (not
    differentiable) and whether they were finite (a 0-dim bool tensor; False: nothing updated).

    One autograd formula per backend. node: the C++ kernels serve the input (kernels.backend_name
    "cpu"; None: ask), whose formula for forward_train is the C++ node registered for AutogradCPU
    (kernels/cpu/autograd.cpp): forward_train is called as it is. A Python autograd.Function
    costs more than the whole step of a small layer (measured: (60, 100) forward + backward
    59 us with it, torch.nn 36 us). Every other backend, and SyncBatchNorm: _BatchNormTrain.
    """
    if node is None:
        node = kernels.backend_name(input) == "cpu"
    if sync is None and node:
        output, mean, m2, _, finite = forward_train(
            input, weight, bias, residual, relu, eps, running_mean, running_var,
            num_batches_tracked, momentum)
        return output, mean, m2, finite
    running = RunningStats(running_mean, running_var, num_batches_tracked, momentum)
    return _BatchNormTrain.apply(input, weight, bias, residual, eps, relu, sync, running)


def batch_norm_train_step(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None,
    relu: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, bool | Tensor]:
    """batch_norm_train on the C++ kernels (kernels.backend_name "cpu"), without a StatsSync,
    returning only (output, finite), finite a bool where reading the flag is free (else the
    0-dim bool tensor, as batch_norm_train's): forward_train called from C++ through the dispatcher
    (kernels/cpu ops.cpp: a torch.ops call costs 1.5 us more than torch's own bindings, as much
    as the whole kernel of a small layer); through torch.ops where that entry declines (a tensor
    subclass, a torch function mode, an int eps)."""
    direct = _cpu.forward_train
    if direct is not None:
        step = direct(input, weight, bias, residual, relu, eps, running_mean, running_var,
                      num_batches_tracked, momentum)
        if step is not NotImplemented:
            return step
    output, _, _, _, finite = forward_train(input, weight, bias, residual, relu, eps,
                                            running_mean, running_var, num_batches_tracked,
                                            momentum)
    return output, finite


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm_eval(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Normalize with given statistics (running estimates): one elementwise pass.

    Without gradients to record this is the single op forward_eval (entered from C++ where the
    extension's entry takes the arguments, else through torch.ops); with them, elemt (which has
    an autograd formula) on invstd computed here.
    """
    if not _needs_grad(input, mean, var, weight, bias, residual):
        direct = _cpu.forward_eval  # from C++, as batch_norm_train_step's; None without _C
        if direct is not None:
            output = direct(input, mean, var, weight, bias, residual, relu, eps)
            if output is not NotImplemented:
                return output
        return forward_eval(input, mean, var, weight, bias, residual, relu, eps)
    acc = stat_dtype(input.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    return elemt(input, mean.to(acc), invstd, weight, bias, residual, relu)
