"""Composite fallback: the four batch-norm primitives written with torch operations.

This file is also the contract every backend (kernels/cpu/, kernels/triton.py) implements with
the same four functions, the same arguments and the same results:

    stats(input)                                   -> (mean, m2)
    elemt(input, mean, invstd, weight, bias, residual, relu)          -> output
    backward_reduce(grad_out, input, mean, invstd, output)            -> (sum_dy, sum_dy_xhat)
    backward_elemt(grad_out, input, mean, invstd, weight,
                   mean_dy, mean_dy_xhat, output)                     -> grad_input

Conventions shared by all backends:
- input is (N, C, *): the channel axis is dim 1, whatever the memory layout (contiguous or
  channels_last; ops.py hands backends nothing else). grad_out, residual and output have the
  layout of input.
- Per-channel tensors (mean, invstd, weight, bias, mean_dy, mean_dy_xhat) are 1-D of size C.
  Statistics are float64 for float64 input and float32 otherwise (fp16/bf16 sums lose digits).
- Elementwise results (output, grad_input) have input's dtype and input's memory layout
  (torch.empty_like(input)).
- An empty input (N = 0, an empty rank of SyncBatchNorm) has stats (0, 0): count 0.
- count, the number of elements per channel, is input.numel() // C; backends never need it
  beyond stats, because backward_elemt takes means (sum / count), computed by the caller. That
  keeps SyncBatchNorm, whose count is global, on the same kernels.
- output, when given to the backward ops, is the forward output of a fused ReLU: the gradient
  is masked by output > 0 before anything else (the mask is recomputed, never saved).

The fused ops (forward_train, backward_train, forward_eval, update_running_stats) are defined
below by composing the four primitives through torch.ops.batchnorm, so that on a device whose
primitives have kernels (CUDA: Triton) the composition runs on them; the CPU extension has its
own fused kernels (one sweep per channel while its data are in cache: 5 tensor-sized memory
passes per training step instead of the 8 of the four primitives).
"""

import torch
from torch import Tensor

from batchnorm.layout import channel_view, reduce_dims, relu_masked, stat_dtype, values_per_channel


def stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((x - mean)^2) over every axis but dim 1.

    Shifted, two-pass: the data are first shifted by one sample of each channel, so that the
    sums see values of the channel's spread, not of its offset (float32, mean 1e4, std 1: the
    plain mean is off by several ulps of 1e4, the textbook E[x^2] - E[x]^2 by everything).
    """
    x = input.to(stat_dtype(input.dtype))
    dims, shape = reduce_dims(x), channel_view(x)
    if x.numel() == 0:  # an empty rank of SyncBatchNorm: count 0 contributes nothing
        return x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
    shift = x[(0, slice(None)) + (0,) * (x.dim() - 2)].view(shape)  # x[0, :, 0, ...]
    centred = x - shift
    mean_centred = centred.mean(dims)
    m2 = (centred - mean_centred.view(shape)).square().sum(dims)
    return shift.view(-1) + mean_centred, m2


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
    shape = channel_view(input)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (input.to(invstd.dtype) - mean.view(shape)) * scale.view(shape)  # x - mean first: stable
    if bias is not None:
        y = y + bias.to(invstd.dtype).view(shape)
    if residual is not None:
        y = y + residual.to(invstd.dtype)
    if relu:
        y = y.clamp_min(0)
    out = torch.empty_like(input)
    out.copy_(y)
    return out


def backward_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, output: Tensor | None
) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * x_hat) per channel; dy masked by a fused ReLU."""
    acc = mean.dtype
    dims, shape = reduce_dims(input), channel_view(input)
    dy = relu_masked(grad_out, output).to(acc)
    x_hat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
    return dy.sum(dims), (dy * x_hat).sum(dims)


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
    """grad_input = (dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight.

    With mean_dy = mean_dy_xhat = 0 this is the eval-mode gradient dy * invstd * weight.
    """
    acc = mean.dtype
    shape = channel_view(input)
    dy = relu_masked(grad_out, output).to(acc)
    x_hat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = (dy - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) * scale.view(shape)
    out = torch.empty_like(input)
    out.copy_(dx)
    return out


# ---------------------------------------------------------------------------------------------
# The fused ops as compositions of the primitives (see ops.py for their contract)
# ---------------------------------------------------------------------------------------------


def forward_train(input, weight, bias, residual, relu, eps, running_mean, running_var,
                  num_batches_tracked, momentum):
    """stats, invstd, elemt, then update_running_stats.

    Returns (output, mean, m2, invstd, finite)."""
    ops = torch.ops.batchnorm
    mean, m2 = ops.stats(input)
    count = values_per_channel(input)
    wide_mean, wide_m2 = _rescued(input, mean, m2)
    invstd = torch.rsqrt(wide_m2 / count + eps).to(mean.dtype)  # the biased variance normalizes
    output = ops.elemt(input, mean, invstd, weight, bias, residual, relu)
    if running_mean is not None and running_var is not None:
        counts = torch.full((), count, dtype=wide_m2.dtype, device=wide_m2.device)
        finite = ops.update_running_stats(running_mean, running_var, num_batches_tracked,
                                          wide_mean, wide_m2, counts, momentum)
    else:
        finite = torch.isfinite(wide_m2).all() & torch.isfinite(wide_mean).all()
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    return output, mean, m2, invstd, finite


def _rescued(input: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """mean and m2, recomputed in float64 when float32 statistics overflowed on finite data
    (values near 1e30 square beyond float32). On the CPU only, outside tracing: the check
    reads a flag, which elsewhere would cost a host synchronisation every step."""
    if (input.device.type != "cpu" or torch.compiler.is_compiling() or m2.dtype == torch.float64
            or bool(torch.isfinite(m2).all()) or not bool(torch.isfinite(input).all())):
        return mean, m2
    return stats(input.double())


def backward_train(grad_out, input, mean, invstd, weight, output):
    """backward_reduce, then backward_elemt with the means; returns (grad_input, sums)."""
    ops = torch.ops.batchnorm
    count = values_per_channel(input)
    sum_dy, sum_dy_xhat = ops.backward_reduce(grad_out, input, mean, invstd, output)
    grad_input = ops.backward_elemt(grad_out, input, mean, invstd, weight, sum_dy / count,
                                    sum_dy_xhat / count, output)
    return grad_input, sum_dy, sum_dy_xhat


def forward_eval(input, running_mean, running_var, weight, bias, residual, relu, eps):
    """elemt with the given statistics: invstd = 1 / sqrt(running_var + eps)."""
    acc = stat_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return torch.ops.batchnorm.elemt(input, running_mean.to(acc), invstd, weight, bias,
                                     residual, relu)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, m2, count,
                         momentum):
    """running <- running + factor * (batch - running), unless the batch is not finite.

    Traceable and free of host synchronisation (GPUs, torch.compile): the skip is a
    torch.where, the cumulative factor a tensor. running_var takes the unbiased m2 / (count - 1).
    """
    with torch.no_grad():
        finite = torch.isfinite(m2).all() & torch.isfinite(mean).all()
        if num_batches_tracked is not None:
            num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
        if momentum is None:  # cumulative moving average: factor 1 / (batches seen)
            factor = 1.0 / num_batches_tracked.clamp_min(1).to(mean.dtype)
        else:
            factor = momentum
        unbiased_var = m2 / (count.to(m2.dtype) - 1)
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            current = running.to(batch.dtype)
            running.copy_(torch.where(finite, current + factor * (batch - current), current))
    return finite
