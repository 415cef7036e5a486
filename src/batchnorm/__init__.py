"""batchnorm: Batch Normalization (Ioffe & Szegedy, 2015) from first principles to production.

    batchnorm.reference            NumPy specification of the paper's Algorithms 1 and 2
    batchnorm.functional           batch_norm(...), torch.nn.functional's signature
    batchnorm.BatchNorm1d/2d/3d    drop-in torch.nn modules on fast kernels
    batchnorm.convert / to_torch   swap a model's batch-norm layers both ways
"""

from batchnorm import functional
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
    convert,
    to_torch,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "BatchNormAddReLU2d", "BatchNormAddReLU3d",
    "convert", "to_torch", "functional",
]
