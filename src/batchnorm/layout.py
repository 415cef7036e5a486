"""Layout helpers every layer may use: the channel view, the reduced axes, the memory format, the
statistics' dtype, the gradient through a fused ReLU, and sizes as plain ints for checks."""

import torch
from torch import Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (fp16 sums overflow)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sizes(x: Tensor) -> torch.Size:
    """x.shape with Python ints, for argument checks. While torch.jit.trace records, each size in
    x.shape is a traced 0-dim tensor: a Python comparison of one warns (TracerWarning) and is
    frozen into the trace as the example's value anyway; reading x.shape there also records a
    size op per dimension (~40 us). aten.size gives the values as ints and records nothing
    (TorchScript-based ONNX export traces every layer this way)."""
    if torch.jit.is_tracing():
        return torch.Size(torch.ops.aten.size.default(x))
    return x.shape


def channel_view(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against x: (1, C, 1, ...)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def values_per_channel(x: Tensor) -> int:
    """How many values each channel's statistics are taken over (the paper's m): numel / C."""
    return x.numel() // x.shape[1]


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis but the channel axis."""
    return [0, *range(2, x.dim())]


def memory_format(x: Tensor) -> torch.memory_format:
    """The dense layout x is in: channels_last(_3d) when x is stored that way, else contiguous."""
    if (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    if (x.dim() == 5 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return torch.channels_last_3d
    return torch.contiguous_format


def relu_masked(grad_out: Tensor, output: Tensor | None) -> Tensor:
    """Gradient through a fused ReLU: zero where the output was clamped."""
    if output is None:
        return grad_out
    return torch.where(output > 0, grad_out, torch.zeros_like(grad_out))
