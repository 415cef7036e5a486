"""Frozen batch norm: eval-mode batch norm with buffers only, as torchvision.ops.FrozenBatchNorm2d.
"""


import torch
from torch import Tensor
from torch.nn.modules import batchnorm as torch_bn

from batchnorm import functional
from batchnorm.nn import fuses_relu, replace_modules


class FrozenBatchNorm(torch.nn.Module):
    """Batch norm with fixed statistics and affine parameters: buffers only, nothing to train.

    The state_dict is torchvision.ops.FrozenBatchNorm2d's (weight, bias, running_mean,
    running_var, all buffers); a BatchNorm's state_dict loads too (num_batches_tracked is
    dropped). The output is eval-mode batch norm's. Any input rank >= 2; relu=True (keyword)
    fuses a ReLU, and forward(x, residual) adds a residual first, as BatchNormAddReLU2d.
    """

    _ranks: tuple[int, ...] | None = None  # None: any rank >= 2
    # the buffers __init__ registers, typed (as torch.nn's _NormBase types its own)
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, *, relu: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.relu = num_features, eps, relu
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm's state_dict loads
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        ranks_ok = input.dim() >= 2 if self._ranks is None else input.dim() in self._ranks
        if not ranks_ok or input.shape[1] != self.num_features:
            expected = ("(N, C, *)" if self._ranks is None
                        else " or ".join(f"{r}D" for r in self._ranks))
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects {expected} "
                             f"input with {self.num_features} channels in dim 1, got input of "
                             f"shape {tuple(input.shape)}")
        return functional.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                     self.bias, False, 0.0, self.eps, residual=residual,
                                     relu=self.relu)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (", relu=True" if self.relu else "")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen batch norm over (N, C, H, W) input: torchvision.ops.FrozenBatchNorm2d's state_dict."""

    _ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input."""

    _ranks = (5,)


def _frozen_class(module: torch_bn._BatchNorm) -> type:
    for torch_cls, frozen_cls in ((torch.nn.BatchNorm1d, FrozenBatchNorm1d),
                                  (torch.nn.BatchNorm2d, FrozenBatchNorm2d),
                                  (torch.nn.BatchNorm3d, FrozenBatchNorm3d)):
        if isinstance(module, torch_cls):
            return frozen_cls
    return FrozenBatchNorm  # SyncBatchNorm and other rank-agnostic batch norms


@torch.no_grad()
def frozen_from(module: torch_bn._BatchNorm) -> FrozenBatchNorm:
    """A FrozenBatchNorm with module's current statistics and affine parameters (copied)."""
    if module.running_mean is None or module.running_var is None:
        raise ValueError(f"cannot freeze {type(module).__name__}({module.num_features}): it has "
                         f"no running statistics (track_running_stats=False)")
    stats = module.running_mean
    frozen = _frozen_class(module)(module.num_features, module.eps,
                                   relu=fuses_relu(module), device=stats.device,
                                   dtype=stats.dtype)
    frozen.running_mean.copy_(module.running_mean)
    frozen.running_var.copy_(module.running_var)
    if module.weight is not None:
        frozen.weight.copy_(module.weight)
    if module.bias is not None:
        frozen.bias.copy_(module.bias)
    return frozen


def freeze_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every batch-norm layer of model (torch's, this package's, synchronized, ghost,
    renorm) by a FrozenBatchNorm holding a copy of its statistics and affine parameters, in place.

    The model then computes, in train and eval mode alike, what it computed in eval mode before
    (detection / fine-tuning with small batches). Returns model, or the new layer when model
    itself is a batch-norm layer.
    """
    return replace_modules(
        model, lambda name, m: frozen_from(m) if isinstance(m, torch_bn._BatchNorm) else None)

