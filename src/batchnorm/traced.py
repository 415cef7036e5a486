"""Batch norm as tracers record it (torch.compile, torch.export, torch.jit.trace): the whole
functional semantics in plain torch operations.

The composite's torch operations are traced instead of the batchnorm:: ops: Inductor fuses them
with their neighbours (our ops are opaque to it), an exported graph holds core aten operations
only (it loads and runs without this package), and TorchScript records plain aten calls.
"""

import torch
from torch import Tensor

from batchnorm.kernels import composite
from batchnorm.layout import reduce_dims, relu_masked, stat_dtype, values_per_channel

__all__ = ["tracing", "batch_norm"]


def tracing() -> bool:
    """True while torch.compile, torch.export or torch.jit.trace records the call."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing())


class _TrainForward(torch.autograd.Function):
    """Training batch norm in torch operations: var_mean (a Welford reduction in Inductor, stable
    without a shift) and the composite's elemt forward, the composite's backward_reduce and
    backward_elemt backward (the closed form: autograd through var_mean and the broadcasts would
    add reductions that Inductor cannot remove)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, relu):
        acc = stat_dtype(input.dtype)
        var, mean = torch.var_mean(input.to(acc), reduce_dims(input), correction=0)
        invstd = torch.rsqrt(var + eps)
        output = composite.elemt(input, mean, invstd, weight, bias, residual, relu)
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, mean, invstd, output if relu else None)
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        input, weight, mean, invstd, relu_output = ctx.saved_tensors
        needs = ctx.needs_input_grad
        sum_dy, sum_dy_xhat = composite.backward_reduce(grad_out, input, mean, invstd,
                                                        relu_output)
        grad_input = grad_weight = grad_bias = grad_residual = None
        if needs[0]:
            count = values_per_channel(input)
            grad_input = composite.backward_elemt(grad_out, input, mean, invstd, weight,
                                                  sum_dy / count, sum_dy_xhat / count,
                                                  relu_output)
        if needs[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if needs[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if needs[3] and ctx.has_residual:
            grad_residual = relu_masked(grad_out, relu_output)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, training: bool,
               momentum: float | None, eps: float, *, residual: Tensor | None = None,
               relu: bool = False, num_batches_tracked: Tensor | None = None) -> Tensor:
    """functional.batch_norm in traceable torch operations (arguments already checked).

    Training: batch statistics; running_mean / running_var (when both given) updated in place by
    the composite's update (the NaN/Inf guard a torch.where, momentum=None a tensor factor over
    num_batches_tracked: no graph break), else num_batches_tracked only counted. Eval: running
    statistics, one elementwise pass.
    """
    if not training:
        assert running_mean is not None and running_var is not None, "checked by the caller"
        acc = stat_dtype(input.dtype)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        return composite.elemt(input, running_mean.to(acc), invstd, weight, bias, residual, relu)
    output, mean, var = _TrainForward.apply(input, weight, bias, residual, eps, relu)
    if running_mean is not None and running_var is not None:
        count = values_per_channel(input)
        composite.update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                       var * count,
                                       torch.full((), count, dtype=var.dtype, device=var.device),
                                       momentum)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return output
