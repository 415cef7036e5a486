"""Ghost batch norm (Hoffer et al. 2017): statistics over virtual batches of a fixed size,
by one reshape, no loop over chunks.
"""

import warnings

import torch
from torch import Tensor

from batchnorm import functional as F
from batchnorm import nn, ops


def ghost_chunk_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the virtual batches a batch of `batch` samples is split into, in order.

    max(1, batch // virtual_batch_size) chunks of virtual_batch_size samples; the remainder
    joins the LAST chunk instead of forming a small one of its own, so a virtual batch is never
    smaller than virtual_batch_size unless the whole batch is (a trailing chunk of one sample has
    no variance: keras#15790, tabnet#243). 10 by 4 -> [4, 6];  3 by 4 -> [3].
    """
    chunks = max(1, batch // virtual_batch_size)
    return [virtual_batch_size] * (chunks - 1) + [batch - virtual_batch_size * (chunks - 1)]


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    virtual_batch_size: int,
    *,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch norm whose training statistics are those of virtual batches (ghost_chunk_sizes).

    Equal to normalizing each chunk with batch norm in turn, running statistics included: they
    are updated once per chunk, in order (a closed form of the repeated update, no loop).
    training=False normalizes with running_mean / running_var, as plain batch norm.
    """
    if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    if not training or input.numel() == 0:
        return F._batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                             eps, num_batches_tracked=num_batches_tracked)
    F._check(input, running_mean, running_var, weight, bias, None, False, momentum, eps)
    sizes = ghost_chunk_sizes(input.shape[0], virtual_batch_size)
    per_sample = input.numel() // (input.shape[0] * input.shape[1])
    if min(sizes) * per_sample <= 1:
        raise ValueError(
            f"ghost batch norm expects more than 1 value per channel in every virtual batch when "
            f"training, got virtual batches of {sizes} samples of input size {tuple(input.size())}"
        )
    layout = ops.memory_format(input)
    C, spatial, v = input.shape[1], input.shape[2:], virtual_batch_size
    full = len(sizes) if sizes[-1] == v else len(sizes) - 1  # chunks of exactly v samples

    outputs, means, m2s, counts = [], [], [], []
    if full:
        # (full v, C, *) -> (full, v, C, *) -> (v, full, C, *) -> (v, full C, *): each chunk's
        # channels become channels of one batch norm over v samples (one copy, no loop)
        head = input[:full * v].contiguous().view(full, v, C, *spatial).transpose(0, 1)
        head = head.reshape(v, full * C, *spatial)
        w = None if weight is None else weight.repeat(full)  # grads sum back over the chunks
        b = None if bias is None else bias.repeat(full)
        out, mean, m2, count = ops.batch_norm_train(head, w, b, eps)
        outputs.append(out.view(v, full, C, *spatial).transpose(0, 1).reshape(full * v, C,
                                                                            *spatial))
        means.append(mean.view(full, C))
        m2s.append(m2.view(full, C))
        counts.append(count.expand(full))
    if full < len(sizes):  # the last chunk, v + remainder samples (or the whole, smaller batch)
        tail = input[full * v:].contiguous(memory_format=layout)
        out, mean, m2, count = ops.batch_norm_train(tail, weight, bias, eps)
        outputs.append(out)
        means.append(mean.view(1, C))
        m2s.append(m2.view(1, C))
        counts.append(count.view(1))
    output = torch.cat(outputs).contiguous(memory_format=layout)

    if running_mean is not None and running_var is not None:
        count = torch.cat(counts).view(-1, 1)
        _update_running_stats_chunks(running_mean, running_var, torch.cat(means),
                                     torch.cat(m2s) / (count - 1), momentum, num_batches_tracked)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    return output


@torch.no_grad()
def _update_running_stats_chunks(running_mean: Tensor, running_var: Tensor, means: Tensor,
                                 unbiased_vars: Tensor, momentum: float | None,
                                 num_batches_tracked: Tensor | None) -> None:
    """Apply the running-statistics update once per chunk (rows of means), in order, in closed form.

    momentum m, K chunks: running_K = (1 - m)^K running_0 + sum_i m (1 - m)^(K-1-i) batch_i.
    momentum None (cumulative average over n0 batches so far): (n0 running_0 + sum_i batch_i) /
    (n0 + K). As functional._update_running_stats, unbiased variances go into running_var, and a
    batch with non-finite statistics leaves the buffers (and num_batches_tracked) unchanged.
    """
    K, acc = means.shape[0], means.dtype
    finite = torch.isfinite(means).all() & torch.isfinite(unbiased_vars).all()
    old_mean, old_var = running_mean.to(acc), running_var.to(acc)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        seen = num_batches_tracked.to(acc)
        new_mean = (seen * old_mean + means.sum(0)) / (seen + K)
        new_var = (seen * old_var + unbiased_vars.sum(0)) / (seen + K)
    else:
        powers = torch.arange(K - 1, -1, -1, dtype=acc, device=means.device)  # K-1 ... 0
        weights = (momentum * (1 - momentum) ** powers).view(K, 1)
        keep = (1 - momentum) ** K
        new_mean = keep * old_mean + (weights * means).sum(0)
        new_var = keep * old_var + (weights * unbiased_vars).sum(0)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype) * K)
    running_mean.copy_(torch.where(finite, new_mean, old_mean))
    running_var.copy_(torch.where(finite, new_var, old_var))
    if means.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(finite):
        warnings.warn("ghost batch norm: this training batch has non-finite statistics; "
                      "running_mean and running_var were left unchanged", RuntimeWarning,
                      stacklevel=4)


class _GhostBatchNorm(nn._BatchNorm):
    """Ghost batch norm: training statistics over virtual batches of virtual_batch_size samples."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, virtual_batch_size: int) -> None:
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got "
                             f"{virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, num_batches_tracked = self._buffers_to_update()
        return ghost_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                self._use_batch_stats(), self.momentum, self.eps,
                                self.virtual_batch_size, num_batches_tracked=num_batches_tracked)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input (TabNet's GBN)."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input."""


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input."""
