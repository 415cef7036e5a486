"""SyncBatchNorm: batch statistics over the global batch of every process, on torch.distributed.

Single-process and synchronized batch norm are the same four ops (ops.py); this file only adds
the StatsSync (defined here) that ops.batch_norm_train calls between them:

    forward   stats (per rank: count, mean, M2) -> combine_stats: ONE all_gather of the packed
              [count, mean, M2], then Chan's parallel formula on every rank -> elemt
    backward  backward_reduce (per rank: sum dy, sum dy x_hat) -> sum_grads: ONE all_reduce of
              the packed pair -> backward_elemt

Works on any backend torch.distributed runs: gloo on CPU (torch's own SyncBatchNorm is GPU
only), NCCL on GPU. Ranks may hold different batch sizes, an empty batch included: each rank's
statistics are weighted by its count, so the result is exactly that of the concatenated batch
(pytorch#22192, apex#387), and an empty rank (count 0) still joins both collectives so that no
rank waits forever. World size 1, no initialized process group, and evaluation mode take the
single-process path.
"""

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules import batchnorm as torch_bn
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm import nn

__all__ = ["SyncBatchNorm", "StatsSync", "ProcessGroupSync", "combine_moments"]


class StatsSync(Protocol):
    """What SyncBatchNorm adds to the single-process path: one collective after each reduce."""

    def combine_stats(self, mean: Tensor, m2: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-rank (mean, M2, count) -> global (mean, M2, count) by Chan's parallel formula."""

    def sum_grads(self, sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
        """Per-rank (sum dy, sum dy x_hat) -> their sums over every rank."""


def combine_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-part (count, mean, M2) -> (count, mean, M2) of the union: Chan's parallel formula.

    counts (P, 1), means and m2s (P, C), one row per part (rank). For two parts Chan et al. give
    M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n; applied to P parts it sums to
        mean = sum_p n_p mean_p / n,   M2 = sum_p M2_p + sum_p n_p (mean_p - mean)^2,
    written with deviations from the global mean (never sum x^2 - n mean^2, which cancels).
    A part with count 0 contributes nothing (its mean and M2 must be finite: pass zeros).
    """
    count = counts.sum()
    mean = (counts * means).sum(0) / count
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return count, mean, m2


class ProcessGroupSync(StatsSync):
    """The StatsSync of a torch.distributed process group (None: the default group)."""

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group

    def combine_stats(self, mean: Tensor, m2: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
        channels = mean.numel()
        # float64 for the combination: counts are exact integers there, and the weighted sums
        # of many ranks keep their digits; the result goes back to the statistics' dtype.
        acc = torch.float64
        if count == 0:  # an empty batch's mean is 0/0: send zeros, weighted by count 0 anyway
            mean, m2 = torch.zeros_like(mean), torch.zeros_like(m2)
        local = torch.cat([mean.new_full((1,), count, dtype=acc), mean.to(acc), m2.to(acc)])
        world = dist.get_world_size(self.process_group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self.process_group)
        table = torch.stack(gathered)  # (world, 1 + 2C): [count, mean..., M2...] per rank
        total, global_mean, global_m2 = combine_moments(
            table[:, :1], table[:, 1:1 + channels], table[:, 1 + channels:]
        )
        if not torch.compiler.is_compiling():
            # The single-process check ("more than 1 value per channel") on the global batch:
            # every rank sees the same total, so all raise together, after the collective.
            values = int(total.item())
            if values <= 1:
                raise ValueError(
                    f"SyncBatchNorm expects more than 1 value per channel over all processes "
                    f"when training, got {values} (this rank holds {count}; input of shape "
                    f"(N, C, *) with N * prod(*) values per channel on each rank)"
                )
        return global_mean.to(mean.dtype), global_m2.to(m2.dtype), total

    def sum_grads(self, sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
        channels = sum_dy.numel()
        packed = torch.cat([sum_dy, sum_dy_xhat])  # one collective for both sums
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
        return packed[:channels], packed[channels:]


class SyncBatchNorm(nn._BatchNorm):
    """Batch norm over the global batch of a process group, as torch.nn.SyncBatchNorm.

    Input (N, C, *) of any rank >= 2, contiguous or channels_last. Each process passes its own
    part of the batch (any size, empty included); while training, the mean and variance are those
    of all parts concatenated, and the running statistics (identical on every rank) are updated
    with them. Parameter gradients are this rank's own: DDP's gradient all-reduce completes them.
    relu=True (keyword) fuses a ReLU, as batchnorm.BatchNormReLU2d does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, relu: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.relu = relu

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """relu(batch_norm(input) + residual) when given: the one class for every layer that
        convert_sync_batchnorm converts, BatchNormAddReLU's call m(x, residual) included."""
        return self._normalize(input, residual)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expects an input of at least 2 dimensions (N, C, *), got "
                f"{input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"SyncBatchNorm({self.num_features}) expects {self.num_features} channels in "
                f"dim 1, got input of shape {tuple(input.shape)} with {input.shape[1]} channels"
            )

    def _sync(self) -> StatsSync | None:
        """The process group's StatsSync while training with more than one process, else None."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        if dist.get_world_size(self.process_group) == 1:
            return None
        return ProcessGroupSync(self.process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group=None) -> torch.nn.Module:
        """Replace every batch-norm layer of module by a SyncBatchNorm, as torch's classmethod.

        Converts torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm, this package's BatchNorm1d/2d/3d,
        fused BatchNormReLU / BatchNormAddReLU (the ReLU is kept) and SyncBatchNorm (to the new
        process_group). The new layers hold the very same Parameter and buffer objects and keep
        the old ones' hooks and instance attributes (nn.swap_class, as batchnorm.convert), so
        state, optimizer references, tied weights and hooks are kept. Ghost batch norm and batch
        renormalization define their own statistics and are left as they are.
        Returns module, or the new layer when module itself is a batch-norm layer.
        """
        from batchnorm import family  # family builds on nn like this file; imported on use

        def to_sync(name: str, layer: torch.nn.Module) -> torch.nn.Module | None:
            if not isinstance(layer, torch_bn._BatchNorm) or isinstance(layer, family.FAMILY):
                return None
            if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
                raise ValueError(
                    f"convert_sync_batchnorm: {type(layer).__name__} has not seen an input yet "
                    f"(num_features unknown); run one forward pass before converting"
                )
            converted = nn.swap_class(layer, cls)  # the same Parameter and buffer objects
            converted.process_group = process_group
            if nn.fuses_relu(layer):  # BatchNormReLU / BatchNormAddReLU: a class attribute there
                converted.relu = True
            return converted

        return nn.replace_modules(module, to_sync)
