"""Ghost batch norm (Hoffer et al. 2017): statistics over virtual batches of a fixed size,
by one reshape, no loop over chunks.
"""

import torch
from torch import Tensor

from batchnorm import functional, nn, ops
from batchnorm.layout import memory_format


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
        return functional.batch_norm_step(input, running_mean, running_var, weight, bias,
                                          training, momentum, eps,
                                          num_batches_tracked=num_batches_tracked)[0]
    functional.check_arguments(input, running_mean, running_var, weight, bias, None, False, eps,
                               training=True)
    sizes = ghost_chunk_sizes(input.shape[0], virtual_batch_size)
    per_sample = input.numel() // (input.shape[0] * input.shape[1])
    if min(sizes) * per_sample <= 1:
        raise ValueError(
            f"ghost batch norm expects more than 1 value per channel in every virtual batch when "
            f"training, got virtual batches of {sizes} samples of input size {tuple(input.size())}"
        )
    layout = memory_format(input)
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
        out, mean, m2, _ = ops.batch_norm_train(head, w, b, eps)
        outputs.append(out.view(v, full, C, *spatial).transpose(0, 1).reshape(full * v, C,
                                                                            *spatial))
        means += list(mean.view(full, C))
        m2s += list(m2.view(full, C))
        counts += [v * per_sample] * full
    if full < len(sizes):  # the last chunk, v + remainder samples (or the whole, smaller batch)
        tail = input[full * v:].contiguous(memory_format=layout)
        out, mean, m2, _ = ops.batch_norm_train(tail, weight, bias, eps)
        outputs.append(out)
        means.append(mean)
        m2s.append(m2)
        counts.append(tail.shape[0] * per_sample)
    output = torch.cat(outputs).contiguous(memory_format=layout)

    if running_mean is not None and running_var is not None:
        # Once per chunk, in order: exactly batch norm applied to each chunk in turn. A chunk
        # whose statistics are not finite is skipped, as plain batch norm skips such a batch.
        for mean, m2, count in zip(means, m2s, counts, strict=True):
            finite = functional.update_running_stats(running_mean, running_var,
                                                     num_batches_tracked, mean, m2, count, momentum)
            if functional.is_skipped(finite):
                functional.warn_skipped("ghost_batch_norm")
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    return output


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
        running_mean, running_var, num_batches_tracked, batch_stats = self._state()
        return ghost_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                batch_stats, self.momentum, self.eps,
                                self.virtual_batch_size, num_batches_tracked=num_batches_tracked)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input (TabNet's GBN)."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input."""


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input."""
