"""convert() and to_torch(): a model's batch-norm layers swapped between torch.nn's classes and
this package's, in place, from one table of every class we define.

A swapped layer holds the very same Parameter and buffer objects and keeps the old layer's hooks
and instance attributes (nn.swap_class), so state, outputs, optimizer references and hooks are
kept both ways.
"""

import warnings

import torch
from torch.nn.modules import batchnorm as torch_bn
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm import family, nn
from batchnorm.distributed import SyncBatchNorm

__all__ = ["CLASSES", "convert", "to_torch"]

_FUSED = "fuses a ReLU and has no torch.nn equivalent; use its BatchNorm class"
_OWN_STATISTICS = ("computes statistics torch.nn's batch norm does not (ghost batches, renorm "
                   "limits); torch.nn has no equivalent")
_FROZEN = ("is a fixed affine map with no running-statistics update; torch.nn has no equivalent "
           "(a torch.nn BatchNorm in eval mode computes the same in eval only)")

# Every batch-norm class of this package: (ours, the torch.nn class convert() turns into it and
# to_torch() turns it back into; or None and why to_torch refuses it).
CLASSES: tuple[tuple[type, type | str], ...] = (
    (nn.BatchNorm1d, torch.nn.BatchNorm1d),
    (nn.BatchNorm2d, torch.nn.BatchNorm2d),
    (nn.BatchNorm3d, torch.nn.BatchNorm3d),
    (nn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d),
    (nn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
    (nn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d),
    (SyncBatchNorm, torch.nn.SyncBatchNorm),
    (nn.BatchNormReLU1d, _FUSED),
    (nn.BatchNormReLU2d, _FUSED),
    (nn.BatchNormReLU3d, _FUSED),
    (nn.BatchNormAddReLU2d, _FUSED),
    (nn.BatchNormAddReLU3d, _FUSED),
    (family.GhostBatchNorm1d, _OWN_STATISTICS),
    (family.GhostBatchNorm2d, _OWN_STATISTICS),
    (family.GhostBatchNorm3d, _OWN_STATISTICS),
    (family.BatchRenorm1d, _OWN_STATISTICS),
    (family.BatchRenorm2d, _OWN_STATISTICS),
    (family.BatchRenorm3d, _OWN_STATISTICS),
    (family.FrozenBatchNorm1d, _FROZEN),
    (family.FrozenBatchNorm2d, _FROZEN),
    (family.FrozenBatchNorm3d, _FROZEN),
    (family.FrozenBatchNorm, _FROZEN),
)

_FROM_TORCH = {theirs: ours for ours, theirs in CLASSES if isinstance(theirs, type)}
_TO_TORCH = {ours: theirs for ours, theirs in CLASSES if isinstance(theirs, type)}
_REFUSED = {ours: why for ours, why in CLASSES if isinstance(why, str)}


def _fresh_lazy(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A lazy layer that has not seen an input has no state to share: a new one of cls with the
    same arguments (its parameter-inference hook belongs to the new module)."""
    fresh = cls(module.eps, module.momentum, module.affine, module.track_running_stats)
    fresh.train(module.training)
    return fresh


def _torch_name(cls: type) -> str:
    return f"torch.nn.{cls.__name__}" if cls.__module__.startswith("torch.") else cls.__name__


def _refusal(name: str, module: torch.nn.Module, mapping: dict[type, type[torch.nn.Module]],
             refuse: dict[type, str]) -> str | None:
    """Why module cannot be swapped (a TypeError's message), or None."""
    kind, where = type(module), f"{name or 'the model'} ({type(module).__name__})"
    if kind in refuse:
        return f"{where} {refuse[kind]}"
    if kind in mapping and nn.fuses_relu(module) and not nn.fuses_relu(mapping[kind]):
        return (f"{where} fuses a ReLU and {_torch_name(mapping[kind])} has none; it would be "
                f"silently dropped")  # SyncBatchNorm(relu=True)
    return None


def _swap_classes(model: torch.nn.Module, mapping: dict[type, type[torch.nn.Module]], *,
                  refuse: dict[type, str], skipped: list[str]) -> torch.nn.Module:
    """nn.replace_modules with nn.swap_class for each module whose exact type is in mapping. A
    module that cannot be swapped (a type in refuse, a fused ReLU its target lacks) raises a
    TypeError before anything is swapped, so a refused call leaves the model as it was; other
    torch.nn batch-norm subclasses are named in skipped."""
    for name, module in model.named_modules():
        why = _refusal(name, module, mapping, refuse)
        if why is not None:
            raise TypeError(why)

    def swap(name: str, module: torch.nn.Module) -> torch.nn.Module | None:
        kind = type(module)
        if kind in mapping:
            target = mapping[kind]
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                return _fresh_lazy(module, target)
            swapped = nn.swap_class(module, target)
            if isinstance(swapped, nn._BatchNorm):  # swapped's class is target
                swapped._batchnorm_name = name
            return swapped
        if isinstance(module, torch_bn._BatchNorm) and kind.__module__.split(".")[0] not in (
                "batchnorm",):
            skipped.append(f"{name or 'the model'} ({kind.__module__}.{kind.__qualname__})")
        return None

    return nn.replace_modules(model, swap)


def convert(model: torch.nn.Module, *, report: list[str] | None = None) -> torch.nn.Module:
    """Swap every torch.nn batch-norm layer in model for this package's, in place.

    torch.nn.BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d and SyncBatchNorm are converted (CLASSES).
    Subclasses of torch's classes are left as they are (their own methods could differ from
    ours) and named in a warning. `report`, when given, receives one line per layer replaced.
    Returns the model (a new module when model itself is a batch-norm layer).
    """
    skipped: list[str] = []
    before = {name: type(m) for name, m in model.named_modules()}
    converted = _swap_classes(model, _FROM_TORCH, refuse={}, skipped=skipped)
    if report is not None:
        for name, module in converted.named_modules():
            if name in before and before[name] is not type(module):
                report.append(f"{name or 'the model'}: {before[name].__name__} -> "
                              f"batchnorm.{type(module).__name__}")
    if skipped:
        warnings.warn("batchnorm.convert left these batch-norm layers as they are (subclasses of "
                      "torch's classes, whose own methods ours would drop): "
                      + ", ".join(skipped), UserWarning, stacklevel=2)
    return converted


def to_torch(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every batch-norm layer of this package's back to torch.nn's, in place (the inverse
    of convert, sharing state and hooks likewise). A layer torch.nn has no class for (the fused
    ReLU layers, the family: ghost, renorm, frozen; a subclass of one of ours, whose own methods
    would be dropped) raises a TypeError naming the layer and why, and nothing is swapped.
    Returns the model."""
    refuse = dict(_REFUSED)
    for module in model.modules():
        kind = type(module)
        if (isinstance(module, (nn._BatchNorm, family.FrozenBatchNorm))
                and kind not in _TO_TORCH and kind not in refuse):
            refuse[kind] = ("is a subclass of a batchnorm class; to_torch would drop its own "
                            "methods (swap it by hand, e.g. with batchnorm.nn.swap_class)")
    return _swap_classes(model, _TO_TORCH, refuse=refuse, skipped=[])
