"""The traced route: what a batch-norm layer records while torch.compile, torch.export or
torch.jit.trace traces it.

A tracer keeps the operations it sees. Our custom ops would reach an exported graph as opaque
calls (it would then need this package to run), and a consumer that recognizes batch norm by its
operation (onnxruntime's and TensorRT's Conv-BN folding, Inductor's freezing, the ONNX exporters'
BatchNormalization) would not recognize them. So while tracing, a layer records what torch.nn's
layer records, plus this package's extras as plain operations:

    eval (running statistics)   F.batch_norm(training=False): the very call torch.nn's layer
                                makes (aten.batch_norm in torch.export, BatchNormalization in
                                ONNX), then residual add and ReLU as aten.add / aten.relu
    batch statistics only       F.batch_norm(training=True) without buffers, as torch.nn's layer
    (no running buffers)        (eval with track_running_stats=False, functional training
                                without buffers)
    training with buffers       torch's training batch norm without buffers
                                (aten.native_batch_norm: output, batch mean, batch invstd; its
                                autograd formula is torch's), then the running update from that
                                mean and invstd in tensor operations: momentum=None's cumulative
                                factor 1 / num_batches_tracked is a tensor and the NaN/Inf guard
                                a torch.where, so there is no graph break and no host
                                synchronisation (no .item()); under the TorchScript-based ONNX
                                exporter's training mode, torch.nn's own call (ONNX's
                                BatchNormalization updates the statistics itself; no guard)

The training update is done here rather than by torch's op (which updates its buffers itself)
because torch's op knows neither the guard nor a tensor momentum.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from batchnorm.layout import sizes, stat_dtype, values_per_channel

__all__ = ["tracing", "batch_norm"]


def tracing() -> bool:
    """True while torch.compile, torch.export or torch.jit.trace records the call. (Every call
    of a layer asks: jit.trace's own flag is read from torch._C, after is_compiling, which
    torch.compile answers itself, so it never sees that C function.)"""
    return _is_compiling() or _is_exporting() or _jit_tracing()


_is_compiling, _is_exporting = torch.compiler.is_compiling, torch.compiler.is_exporting
_jit_tracing = torch._C._is_tracing


def batch_norm(
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
) -> Tensor:
    """functional.batch_norm's semantics in operations that tracers record (arguments already
    checked by the caller).

    training=False normalizes with running_mean / running_var. training=True normalizes with the
    batch's statistics; with both buffers given it updates them in place (running += factor *
    (batch - running), the unbiased batch variance; factor = momentum, or 1 / num_batches_tracked
    when momentum is None) and counts the batch in num_batches_tracked, except for a batch whose
    statistics are not finite, which changes none of the three. residual is added after the
    affine, then the ReLU.
    """
    # torch.nn's layers pass 0.0 for momentum=None (their cumulative factor needs the buffers)
    factor = 0.0 if momentum is None else momentum
    if not training:
        output = F.batch_norm(input, running_mean, running_var, weight, bias, False, factor, eps)
    elif running_mean is None or running_var is None:  # as torch: both buffers or neither
        output = F.batch_norm(input, None, None, weight, bias, True, factor, eps)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    elif sizes(input).numel() == 0:  # as torch: an empty output, the buffers untouched, the
        # batch counted (sizes: ints under torch.jit.trace)
        output = F.batch_norm(input, None, None, weight, bias, True, factor, eps)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    elif torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
        # The TorchScript-based ONNX exporter in training mode (training=TrainingMode.TRAINING):
        # it has no symbolic for native_batch_norm, and ONNX's BatchNormalization(training_mode=1)
        # updates the running statistics itself, with no way to express the NaN/Inf guard. So
        # record torch.nn's very call (its factor for momentum=None read from the count, as
        # torch.nn's layer reads it): the exported graph is the torch.nn model's.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        output = F.batch_norm(input, running_mean, running_var, weight, bias, True, factor, eps)
    else:
        output, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0,
                                                       eps)
        _update_running_stats(running_mean, running_var, num_batches_tracked, mean, invstd,
                              values_per_channel(input), momentum, eps)
    if residual is not None:
        output = output + residual
    return torch.relu(output) if relu else output


def _update_running_stats(running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Tensor | None, mean: Tensor, invstd: Tensor,
                          count: int, momentum: float | None, eps: float) -> None:
    """running <- running + factor * (batch - running) from the training op's batch mean and
    invstd = 1 / sqrt(var + eps), unless the batch's statistics are not finite.

    The biased variance comes back as 1 / invstd^2 - eps: no second reduction over the input.
    Its absolute error is a few ulps of var + eps, the quantity eval normalizes by.
    running_var stores the unbiased estimate, var * count / (count - 1), while the
    normalization used the biased one (as torch)."""
    with torch.no_grad():  # and detached: torch.jit.trace does not record no_grad
        acc = stat_dtype(invstd.dtype)
        batch_mean = mean.detach().to(acc)
        batch_var = invstd.detach().to(acc).pow(-2) - eps  # var = inf gave invstd = 0: inf
        # NaN or Inf in the input: a NaN or Inf mean or variance; nothing below changes then
        finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
        if num_batches_tracked is not None:
            num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
        if momentum is not None:
            factor: float | Tensor = momentum
        elif num_batches_tracked is not None:  # cumulative average: 1 / (batches counted)
            factor = 1.0 / num_batches_tracked.clamp_min(1).to(acc)
        else:
            factor = 0.0  # torch.nn's factor for momentum=None without a count
        unbiased_var = batch_var * (count / (count - 1))
        for running, batch in ((running_mean, batch_mean), (running_var, unbiased_var)):
            current = running.to(acc)
            running.copy_(torch.where(finite, current + factor * (batch - current), current))
