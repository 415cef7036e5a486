"""The four batch-norm primitives as torch custom ops, and the autograd glue that composes them.

    batchnorm::stats            (input)                        -> (mean, m2)
    batchnorm::elemt            (input, mean, invstd, weight?, bias?, residual?, relu) -> output
    batchnorm::backward_reduce  (grad_out, input, mean, invstd, output?)  -> (sum_dy, sum_dy_xhat)
    batchnorm::backward_elemt   (grad_out, input, mean, invstd, weight?,
                                 mean_dy, mean_dy_xhat, output?)        -> grad_input

kernels/composite.py states the semantics. Each op has a fake (meta) implementation for
torch.compile and an autograd formula written with the other ops or plain torch operations, so
every op is differentiable any number of times (double backward, gradgradcheck).

`batch_norm_train` composes the ops into one training-mode batch norm with the fused backward:
one reduce (sum dy, sum dy * x_hat) and one elementwise pass, the decomposition PyTorch's
SyncBatchNorm uses. A `StatsSync` (distributed.py) is the only difference between single-process
and synchronized batch norm: it combines the per-rank statistics and sums after each reduce.
"""

import types
from typing import Protocol

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.kernels.composite import channel_view, reduce_dims, relu_masked, stat_dtype


def _count(x: Tensor) -> int:
    return x.numel() // x.shape[1]


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("batchnorm::stats", mutates_args=())
def stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((x - mean)^2), in float32 (float64 for float64 input)."""
    return kernels.backend_for(input).stats(input)


@stats.register_fake
def _(input):
    C = input.shape[1]
    dtype = stat_dtype(input.dtype)
    return input.new_empty(C, dtype=dtype), input.new_empty(C, dtype=dtype)


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
        grad = grad + (grad_mean / _count(input)).view(shape)
    if grad_m2 is not None:
        grad = grad + 2 * grad_m2.view(shape) * (input.to(mean.dtype) - mean.view(shape))
    return grad.to(input.dtype)


stats.register_autograd(_stats_backward, setup_context=_stats_setup)


# ---------------------------------------------------------------------------------------------
# elemt
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("batchnorm::elemt", mutates_args=())
def elemt(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
) -> Tensor:
    """(x - mean) * invstd * weight + bias [+ residual] [ReLU], in input's dtype and layout."""
    return kernels.backend_for(input).elemt(input, mean, invstd, weight, bias, residual, relu)


@elemt.register_fake
def _(input, mean, invstd, weight, bias, residual, relu):
    return torch.empty_like(input)


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
    run = _runner(input)
    sum_dy, sum_dy_xhat = run.backward_reduce(grad_out, input, mean, invstd, output)
    w = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    grad_input = grad_mean = grad_invstd = grad_weight = grad_bias = grad_residual = None
    if needs[0]:
        zero = torch.zeros_like(mean)
        grad_input = run.backward_elemt(grad_out, input, mean, invstd, weight, zero, zero, output)
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


elemt.register_autograd(_elemt_backward, setup_context=_elemt_setup)


# ---------------------------------------------------------------------------------------------
# backward_reduce
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("batchnorm::backward_reduce", mutates_args=())
def backward_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, output: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * x_hat); dy masked by output > 0 when output is given."""
    return kernels.backend_for(input).backward_reduce(grad_out, input, mean, invstd, output)


@backward_reduce.register_fake
def _(grad_out, input, mean, invstd, output):
    return torch.empty_like(mean), torch.empty_like(mean)


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


backward_reduce.register_autograd(_backward_reduce_backward, setup_context=_backward_reduce_setup)


# ---------------------------------------------------------------------------------------------
# backward_elemt
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("batchnorm::backward_elemt", mutates_args=())
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
    """(dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight, in input's dtype and layout."""
    return kernels.backend_for(input).backward_elemt(
        grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xhat, output
    )


@backward_elemt.register_fake
def _(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xhat, output):
    return torch.empty_like(input)


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


backward_elemt.register_autograd(_backward_elemt_backward, setup_context=_backward_elemt_setup)


# ---------------------------------------------------------------------------------------------
# Composition: training-mode batch norm with the fused backward
# ---------------------------------------------------------------------------------------------


def memory_format(x: Tensor) -> torch.memory_format:
    """The dense layout x is in: channels_last(_3d) when x is stored that way, else contiguous."""
    if (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    if (x.dim() == 5 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return torch.channels_last_3d
    return torch.contiguous_format


def _plain_eager(t: Tensor) -> bool:
    """True when calling an op would only route to its kernel: autograd is not recording, and
    nothing traces or intercepts (torch.compile, FakeTensor, functorch transforms, dispatch or
    torch-function modes). Then the composition below calls the kernel directly and skips the
    dispatcher's round trip through Python, which costs more than the kernel on small tensors."""
    return (
        not torch.is_grad_enabled()
        and type(t) is Tensor
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


# The four ops under the backends' function names: what _runner returns when the call must go
# through the dispatcher (autograd recording, tracing).
_OPS = types.SimpleNamespace(stats=stats, elemt=elemt, backward_reduce=backward_reduce,
                             backward_elemt=backward_elemt)


def _runner(input: Tensor):
    """The backend module itself when calling an op would only route to it (_plain_eager), else
    the ops. Either has stats / elemt / backward_reduce / backward_elemt with the same arguments;
    only a backend may also have the fused forward_train / backward_train."""
    return kernels.backend_for(input) if _plain_eager(input) else _OPS


class StatsSync(Protocol):
    """What SyncBatchNorm adds to the single-process path: one collective after each reduce."""

    def combine_stats(self, mean: Tensor, m2: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-rank (mean, M2, count) -> global (mean, M2, count) by Chan's parallel formula."""

    def sum_grads(self, sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
        """Per-rank (sum dy, sum dy x_hat) -> their sums over every rank."""


class _BatchNormTrain(torch.autograd.Function):
    """Forward: stats -> (sync) -> invstd -> elemt.
    Backward: backward_reduce -> (sync) -> backward_elemt."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, relu, sync):
        count = _count(input)
        run = _runner(input)
        if sync is None and hasattr(run, "forward_train"):
            # The backend's fused single-process forward (e.g. one sweep per channel while the
            # channel's data stays in cache): the same result as the four-op path below.
            output, mean, m2, invstd = run.forward_train(input, weight, bias, residual, relu, eps)
        else:
            mean, m2 = run.stats(input)
            if sync is not None:
                mean, m2, count = sync.combine_stats(mean, m2, count)
            var = m2 / count  # biased: the normalization uses the batch's own variance
            invstd = torch.rsqrt(var + eps)
            output = run.elemt(input, mean, invstd, weight, bias, residual, relu)
        ctx.eps, ctx.sync, ctx.count = eps, sync, count
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, mean, invstd, output if relu else None)
        # running_var stores the unbiased estimate m2 / (count - 1); the caller updates the buffers
        count_tensor = count if isinstance(count, Tensor) else torch.full(
            (), count, dtype=m2.dtype, device=m2.device)  # no host-to-device copy
        ctx.mark_non_differentiable(mean, m2, count_tensor)
        return output, mean, m2, count_tensor

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_m2, _grad_count):
        input, weight, mean, invstd, relu_output = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format(input))
        if torch.is_grad_enabled():
            # create_graph: mean and invstd depend on input; recompute them through the
            # differentiable ops so that second derivatives see that dependence.
            if ctx.sync is not None:
                raise NotImplementedError("double backward through SyncBatchNorm is not supported")
            mean, m2 = stats(input)
            invstd = torch.rsqrt(m2 / ctx.count + ctx.eps)
        grad_input = grad_weight = grad_bias = grad_residual = None
        run = _runner(input)
        if ctx.sync is None and ctx.needs_input_grad[0] and hasattr(run, "backward_train"):
            # The backend's fused single-process backward: reduce and elementwise in one sweep.
            grad_input, sum_dy, sum_dy_xhat = run.backward_train(
                grad_out, input, mean, invstd, weight, relu_output)
            local_sum_dy, local_sum_dy_xhat = sum_dy, sum_dy_xhat
        else:
            sum_dy, sum_dy_xhat = run.backward_reduce(grad_out, input, mean, invstd, relu_output)
            local_sum_dy, local_sum_dy_xhat = sum_dy, sum_dy_xhat  # parameter grads: per rank
            if ctx.sync is not None:
                sum_dy, sum_dy_xhat = ctx.sync.sum_grads(sum_dy, sum_dy_xhat)
            if ctx.needs_input_grad[0]:
                grad_input = run.backward_elemt(grad_out, input, mean, invstd, weight,
                                                sum_dy / ctx.count, sum_dy_xhat / ctx.count,
                                                relu_output)
        if ctx.needs_input_grad[1]:
            grad_weight = local_sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = local_sum_dy.to(ctx.bias_dtype)
        if ctx.has_residual and ctx.needs_input_grad[3]:
            grad_residual = relu_masked(grad_out, relu_output)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = False,
    sync: StatsSync | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize with the batch's statistics. Returns (output, mean, m2, count) per channel.

    mean, m2 and count are what the running-statistics update needs (not differentiable).
    """
    return _BatchNormTrain.apply(input, weight, bias, residual, eps, relu, sync)


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
    """Normalize with given statistics (running estimates): one elementwise pass."""
    acc = stat_dtype(input.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    return _runner(input).elemt(input, mean.to(acc), invstd, weight, bias, residual, relu)
