"""The batch-norm family: ghost batch norm, batch renormalization, frozen batch norm.

    ghost_batch_norm / GhostBatchNorm1d/2d/3d   statistics over virtual batches of a fixed size
                                                 (Hoffer et al. 2017): one reshape, no loop
    batch_renorm / BatchRenorm1d/2d/3d          Ioffe 2017: batch statistics corrected towards
                                                 the running ones by r and d (no gradient)
    FrozenBatchNorm1d/2d/3d, freeze_batchnorm   eval-mode batch norm with buffers only, as
                                                 torchvision.ops.FrozenBatchNorm2d

Each is built on the same ops as plain batch norm (ops.py); in evaluation mode all of them are
plain batch norm with running statistics, so the model tools (folding, ...) treat them alike.
"""

from batchnorm.family.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    frozen_from,
)
from batchnorm.family.ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    _GhostBatchNorm,
    ghost_batch_norm,
    ghost_chunk_sizes,
)
from batchnorm.family.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    _BatchRenorm,
    batch_renorm,
    renorm_limits,
)

FAMILY = (_GhostBatchNorm, _BatchRenorm)  # batch norms with statistics of their own

__all__ = [
    "ghost_batch_norm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "batch_renorm", "renorm_limits", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "freeze_batchnorm", "frozen_from", "ghost_chunk_sizes",
]
