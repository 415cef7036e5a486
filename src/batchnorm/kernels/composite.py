"""Composite fallback: the four batch-norm primitives written with torch operations.

This file is also the contract every backend (kernels/cpu.py, kernels/triton.py) implements with
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

Optional, for a backend that can fuse the single-process training step (ops.py calls them in
eager mode when no StatsSync is involved, and falls back to the four functions otherwise):

    forward_train(input, weight, bias, residual, relu, eps) -> (output, mean, m2, invstd)
        == mean, m2 = stats(input); invstd = rsqrt(m2 / count + eps);
           output = elemt(input, mean, invstd, weight, bias, residual, relu)
    backward_train(grad_out, input, mean, invstd, weight, output)
        -> (grad_input, sum_dy, sum_dy_xhat)
        == sum_dy, sum_dy_xhat = backward_reduce(grad_out, input, mean, invstd, output);
           grad_input = backward_elemt(grad_out, input, mean, invstd, weight,
                                       sum_dy / count, sum_dy_xhat / count, output)

The point of fusing: the four functions each sweep the whole tensor (8 tensor-sized memory
passes for a training step); a backend that keeps one channel's data in cache between the
reduction and the elementwise pass needs 5.
"""

import torch
from torch import Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (fp16 sums overflow)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_view(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against x: (1, C, 1, ...)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis but the channel axis."""
    return [0, *range(2, x.dim())]


def relu_masked(grad_out: Tensor, output: Tensor | None) -> Tensor:
    """Gradient through a fused ReLU: zero where the output was clamped."""
    if output is None:
        return grad_out
    return torch.where(output > 0, grad_out, torch.zeros_like(grad_out))


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
