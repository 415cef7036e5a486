"""Functional batch norm: torch.nn.functional.batch_norm's signature on this package's ops.

This layer checks arguments and decides which statistics normalize the input; the arithmetic is
in ops.py and the kernels. Extras beyond torch's signature are keyword-only:

    residual=  a tensor shaped like input, added after the affine (ResNet's "BN + add")
    relu=True  ReLU fused into the same pass, forward and backward

Deliberate difference from torch: a training batch whose statistics are not finite (NaN or Inf
in the input) does not update running_mean / running_var; they keep their values, and for
modules num_batches_tracked does not count the batch. On CPU a RuntimeWarning says so; on GPUs
and under torch.compile the skip happens on the device, without a warning (a warning would need a
host synchronisation in every training step). torch would write NaN into the buffers and every
later eval-mode output would be NaN (pytorch#115500).
"""

import os
import sys
import warnings
from types import FrameType

import torch
from torch import Tensor

from batchnorm import ops, traced
from batchnorm.layout import channel_view, memory_format
from batchnorm.ops import StatsSync

__all__ = ["batch_norm"]


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
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       residual=residual, relu=relu)


def _batch_norm(
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
    sync: StatsSync | None = None,
    layer=None,
) -> Tensor:
    """batch_norm for modules: momentum=None (cumulative average over num_batches_tracked), the
    num_batches_tracked count, and a StatsSync for SyncBatchNorm."""
    _check(input, running_mean, running_var, weight, bias, residual, training and sync is None,
           eps, training=training)
    if input.dim() < 2:  # the empty 1-D input torch takes: an empty output
        return input.clone()
    if sync is None and traced.tracing():  # torch.compile / export / jit.trace: torch.nn's ops
        return traced.batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, residual=residual, relu=relu,
                                 num_batches_tracked=num_batches_tracked)
    if sync is None and ops.needs_torch_batch_norm(input, weight, bias, residual, running_mean,
                                                   running_var):
        return ops.torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps, residual, relu, num_batches_tracked)
    if not input.is_contiguous():  # channels_last stays so; any other stride is made dense
        input = input.contiguous(memory_format=memory_format(input))
    if residual is not None:
        residual = residual.contiguous(memory_format=memory_format(input))

    if not training:
        if running_mean is None or running_var is None:
            raise RuntimeError(
                "batch_norm in evaluation mode (training=False) normalizes with running_mean and "
                "running_var, but they were not given; pass them or use training=True"
            )
        if input.numel() == 0:
            return _empty_batch(input, weight, bias)
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps,
                                   residual, relu)

    # As torch: empty output, buffers untouched, the batch still counted. Not with a StatsSync:
    # an empty rank still takes part in both collectives (count 0), or the other ranks deadlock.
    if input.numel() == 0 and sync is None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return _empty_batch(input, weight, bias)

    if running_mean is None or running_var is None:
        running_mean = running_var = None  # as torch: both or neither are updated
    running = ops.RunningStats(running_mean, running_var, num_batches_tracked, momentum)
    output, _, _, finite = ops.batch_norm_train(input, weight, bias, eps, residual, relu, sync,
                                                running)
    if running_mean is not None:
        warn_if_skipped(finite, layer)
    return output


_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside torch and this package: the user's line."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level - 1


def warn_if_skipped(finite: Tensor, layer=None) -> None:
    """The RuntimeWarning for a training batch whose statistics were not finite (CPU only:
    reading the flag elsewhere would cost a host synchronisation every step), pointing at the
    caller's line and naming the layer; the layer counts its skipped batches."""
    if finite.device.type != "cpu" or torch.compiler.is_compiling() or finite.item():
        return
    where = "batch_norm"
    if layer is not None:
        layer.skipped_batches += 1
        name = f" '{layer._batchnorm_name}'" if layer._batchnorm_name else ""
        where = (f"{type(layer).__name__}({layer.num_features}){name} (skipped batches so far: "
                 f"{layer.skipped_batches})")
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


def _check(input, running_mean, running_var, weight, bias, residual, local_batch_stats, eps,
           training=None):
    """Every rejection happens here, before any buffer is touched: what torch rejects, with
    torch's exception types (eps must be positive in training and non-negative in eval; any
    float momentum is taken, as torch takes it).

    local_batch_stats: the batch statistics are this call's own (training without a StatsSync),
    so they need more than one value per channel. training: whether the call normalizes with
    batch statistics at all (default: local_batch_stats; True for SyncBatchNorm and ghost batch
    norm, whose statistics are not the whole local batch's).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm expects input to be a Tensor, got {type(input).__name__}")
    if not (input.is_floating_point()):
        raise NotImplementedError(
            f"batch_norm expects a floating-point input (float16, bfloat16, float32, float64), "
            f"got dtype {input.dtype}"
        )
    if input.dim() < 2 and input.numel() > 0:  # torch takes an empty 1-D input, (0,)
        raise ValueError(
            f"batch_norm expects an input of at least 2 dimensions (N, C, *), got "
            f"{input.dim()}D input of shape {tuple(input.shape)}"
        )
    training = local_batch_stats if training is None else training
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training (it keeps the batch "
                         f"variance away from 0), but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.dim() < 2:
        return
    channels = input.shape[1]
    vectors = (("running_mean", running_mean), ("running_var", running_var),
               ("weight", weight), ("bias", bias))
    for name, tensor in (*vectors, ("residual", residual)):
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(f"batch_norm: {name} is on {tensor.device}, expected "
                               f"{input.device} like the input: every tensor argument must be on "
                               f"the input's device")
    if residual is not None and residual.shape != input.shape:
        raise RuntimeError(
            f"batch_norm: residual must have the input's shape {tuple(input.shape)}, got "
            f"{tuple(residual.shape)}"
        )
    for name, tensor in vectors:
        if tensor is None:
            continue
        if tensor.dim() != 1 or tensor.numel() != channels:
            raise RuntimeError(
                f"batch_norm: {name} should be a 1-D tensor with one value per channel "
                f"({channels} for input of shape {tuple(input.shape)}), got shape "
                f"{tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise RuntimeError(f"batch_norm: {name} must be floating point, got {tensor.dtype}")
    if local_batch_stats and input.numel() > 0:
        values_per_channel = input.numel() // channels
        if values_per_channel <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
