"""batchnorm: Batch Normalization (Ioffe & Szegedy, 2015) from first principles to production.

    batchnorm.reference            NumPy specification of the paper's Algorithms 1 and 2
    batchnorm.functional           batch_norm(...), torch.nn.functional's signature
    batchnorm.BatchNorm1d/2d/3d    drop-in torch.nn modules on fast kernels
    batchnorm.convert / to_torch   swap a model's batch-norm layers both ways
    batchnorm.SyncBatchNorm        statistics over every process (torch.distributed)
    batchnorm.GhostBatchNorm2d, BatchRenorm2d, FrozenBatchNorm2d, freeze_batchnorm   the family
"""

from batchnorm import functional, fusers
from batchnorm.conversion import convert, to_torch
from batchnorm.distributed import SyncBatchNorm
from batchnorm.family import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    freeze_batchnorm,
)
from batchnorm.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)

fusers.register()  # torch's fuse_modules and fx fuse see our layers (fusers.py says how)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "BatchNormAddReLU2d", "BatchNormAddReLU3d",
    "convert", "to_torch", "functional",
    "SyncBatchNorm",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "freeze_batchnorm",
]
