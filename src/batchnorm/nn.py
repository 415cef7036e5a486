"""Drop-in batch-norm modules: torch.nn's constructor, parameters, buffers and state_dict.

The modules subclass torch.nn.modules.batchnorm._BatchNorm, so `isinstance(m, _BatchNorm)` holds
and code that looks for BN layers (weight-decay filters, fusers, converters) keeps working. They
manage state only (which statistics, the momentum or cumulative factor, the buffers); every
computation is one call to batchnorm.functional.
"""

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor
from torch.nn.modules import batchnorm as torch_bn
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm import functional
from batchnorm.layout import sizes

if TYPE_CHECKING:
    from batchnorm.distributed import StatsSync

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "BatchNormAddReLU2d", "BatchNormAddReLU3d",
    "replace_modules", "swap_class", "fuses_relu",
]


class _ScriptableReLU(torch.nn.Module):
    """relu(bn(x)) for TorchScript."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(self.bn(input))


class _ScriptableAddReLU(torch.nn.Module):
    """relu(bn(x) + residual) for TorchScript."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(self.bn(input) + residual)


# (torch.nn class, TorchScript wrapper module or None) that torch.jit.script compiles in a layer's
# place, or None where it cannot.
_ScriptAs = tuple[type, type | None] | None


# torch.nn's batch norm takes bias= (False: scale only) from torch 2.13; with an older torch this
# package builds that layer itself (found on a GPU machine with torch 2.11, where every layer
# failed to construct).
_TORCH_TAKES_BIAS = "bias" in inspect.signature(torch_bn._NormBase.__init__).parameters


class _BatchNorm(torch_bn._BatchNorm):
    """Shared forward; subclasses say which input ranks they take."""

    _ranks: tuple[int, ...] = ()
    _layouts: str = ""
    # Whether the layer applies a fused ReLU after the normalization (BatchNormReLU*,
    # BatchNormAddReLU*, SyncBatchNorm(relu=True)). Other files read it through fuses_relu().
    relu: bool = False
    # Training batches whose statistics were not finite (NaN/Inf), skipped by the guard: read
    # it from the module; it is not in the state_dict (checkpoints stay torch's).
    skipped_batches: int = 0
    _batchnorm_name: str = ""  # the layer's name in the model, set by convert()
    # What torch.jit.script compiles in this class's place: (torch.nn class, wrapper or None),
    # set on each class below; a class without its own (a subclass) cannot be scripted.
    _script_as: _ScriptAs = None

    def __new__(cls, *args, **kwargs):
        module = super().__new__(cls)
        # torch.fx keeps torch.nn's modules as leaves (call_module nodes) and traces into all
        # others, deciding by `module.__module__`. A batch-norm layer must stay a leaf: its
        # forward branches on self.training and on its buffers, which a trace would freeze, and
        # fx tools (fusers, quantizers, this package's tools) look for BN as a call_module. This
        # instance attribute answers fx's question; the class keeps its true module, so pickling
        # and imports are unaffected.
        object.__setattr__(module, "__module__", "torch.nn-compatible:batchnorm.nn")
        return module

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        # The arguments torch.nn accepts, accepted as they are (eps and momentum are checked by
        # the functional call, where torch checks them).
        if _TORCH_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                             dtype, bias=bias)
            return
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not bias:  # the layer torch 2.13 builds for bias=False: an affine without a shift
            self.register_parameter("bias", None)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"{type(self).__name__} expects a {expected} input {self._layouts}, got "
                f"{input.dim()}D input of shape {tuple(sizes(input))}"
            )
        # Only a tensor of the layer fixes its channel count: torch takes any channel count
        # without weight, bias and running buffers (affine=False, track_running_stats=False,
        # Lazy layers included, whose num_features then stays 0).
        shape = sizes(input)  # ints, also under torch.jit.trace
        if shape[1] != self.num_features and (self.affine or self.running_mean is not None):
            if not (isinstance(self, LazyModuleMixin) and self.has_uninitialized_params()):
                raise RuntimeError(
                    f"{type(self).__name__}({self.num_features}) expects {self.num_features} "
                    f"channels in dim 1, got input of shape {tuple(shape)} with {shape[1]} "
                    f"channels"
                )

    def _state(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
        """(running_mean, running_var, num_batches_tracked) to pass down, and whether the call
        normalizes with the batch's statistics: in training, or in eval without running buffers.

        In training the buffers are updated only while track_running_stats is on: turning it off
        after construction freezes them (they are still used in eval), as in torch. Read from
        the module's dicts once (every call pays for nn.Module's attribute lookup otherwise).
        """
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if not self.training:
            return running_mean, running_var, None, running_mean is None and running_var is None
        if not self.track_running_stats:
            return None, None, None, True
        return running_mean, running_var, buffers["num_batches_tracked"], True

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)

    def _normalize(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """The one functional call; residual only from the BatchNormAddReLU classes. The channel
        count is left to the call, which checks it against weight, bias and the running buffers
        (without them torch takes any count); a refusal is then named as this layer's."""
        if input.dim() not in self._ranks:  # (SyncBatchNorm lists none: it checks every call)
            self._check_input_dim(input)  # raises for a rank the layer does not take
        running_mean, running_var, num_batches_tracked, batch_stats = self._state()
        parameters = self._parameters
        try:
            output, finite = functional.batch_norm_step(
                input, running_mean, running_var, parameters["weight"], parameters["bias"],
                batch_stats, self.momentum, self.eps, residual=residual, relu=self.relu,
                num_batches_tracked=num_batches_tracked, sync=self._sync())
        except RuntimeError:
            self._check_input_dim(input)  # the layer's own message for a wrong channel count
            raise
        if finite is not None and functional.is_skipped(finite):
            self.skipped_batches += 1
            name = f" '{self._batchnorm_name}'" if self._batchnorm_name else ""
            functional.warn_skipped(f"{type(self).__name__}({self.num_features}){name} (skipped "
                                    f"batches so far: {self.skipped_batches})")
        return output

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What torch.jit.script compiles in our place: torch.nn's layer holding the same
        Parameter and buffer objects (TorchScript cannot compile our Python forward), with the
        fused ReLU / residual add as TorchScript-able modules around it."""
        twin = type(self).__dict__.get("_script_as")  # the exact class's: not a subclass's
        if twin is None:
            raise RuntimeError(
                f"torch.jit.script cannot compile {type(self).__name__}: it has no torch.nn "
                f"equivalent; use torch.compile or torch.export, or batchnorm.to_torch(model) "
                f"for the layers that have one")
        base, wrapper = twin
        bn = swap_class(self, base)
        return bn if wrapper is None else wrapper(bn)

    def _sync(self) -> "StatsSync | None":
        """How batch statistics are combined across processes: None here (this process only);
        distributed.SyncBatchNorm returns its process group's StatsSync while training."""
        return None


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input, as torch.nn.BatchNorm1d."""

    _ranks, _layouts = (2, 3), "(N, C) or (N, C, L)"
    _script_as: _ScriptAs = (torch.nn.BatchNorm1d, None)


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input, contiguous or channels_last, as torch.nn.BatchNorm2d."""

    _ranks, _layouts = (4,), "(N, C, H, W)"
    _script_as: _ScriptAs = (torch.nn.BatchNorm2d, None)


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input, as torch.nn.BatchNorm3d."""

    _ranks, _layouts = (5,), "(N, C, D, H, W)"
    _script_as: _ScriptAs = (torch.nn.BatchNorm3d, None)


class BatchNormReLU1d(BatchNorm1d):
    """relu(batch_norm(x)) in one pass forward and one backward; state_dict of a BatchNorm1d."""

    relu = True
    _script_as = (torch.nn.BatchNorm1d, _ScriptableReLU)


class BatchNormReLU2d(BatchNorm2d):
    """relu(batch_norm(x)) fused; state_dict of a BatchNorm2d."""

    relu = True
    _script_as = (torch.nn.BatchNorm2d, _ScriptableReLU)


class BatchNormReLU3d(BatchNorm3d):
    """relu(batch_norm(x)) fused; state_dict of a BatchNorm3d."""

    relu = True
    _script_as = (torch.nn.BatchNorm3d, _ScriptableReLU)


class _AddReLU:
    """forward(input, residual), the residual required: relu(batch_norm(input) + residual)."""

    relu = True
    _normalize: Callable[[Tensor, Tensor | None], Tensor]  # _BatchNorm's, which it is mixed into

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return self._normalize(input, residual)


# The ignores below (mypy's [misc]): forward requires the residual _BatchNorm.forward makes optional
class BatchNormAddReLU2d(_AddReLU, BatchNorm2d):  # type: ignore[misc]
    """relu(batch_norm(x) + residual) fused: the end of a ResNet block. Call as m(x, residual)."""

    _script_as = (torch.nn.BatchNorm2d, _ScriptableAddReLU)


class BatchNormAddReLU3d(_AddReLU, BatchNorm3d):  # type: ignore[misc]
    """relu(batch_norm(x) + residual) fused, for (N, C, D, H, W). Call as m(x, residual)."""

    _script_as = (torch.nn.BatchNorm3d, _ScriptableAddReLU)


class LazyBatchNorm1d(torch_bn._LazyNormBase, BatchNorm1d):
    """BatchNorm1d whose num_features is read from the first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(torch_bn._LazyNormBase, BatchNorm2d):
    """BatchNorm2d whose num_features is read from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(torch_bn._LazyNormBase, BatchNorm3d):
    """BatchNorm3d whose num_features is read from the first input."""

    cls_to_become = BatchNorm3d


def fuses_relu(module: object) -> bool:
    """Whether module (or a module class) is a batch norm with a fused ReLU (our `relu` flag,
    FrozenBatchNorm's too).

    torch.nn's layers have no such flag, and a model may hold a child module named relu: only a
    bool counts."""
    relu = getattr(module, "relu", False)
    return relu if isinstance(relu, bool) else False


# ---------------------------------------------------------------------------------------------
# Swapping torch.nn modules for these and back
# ---------------------------------------------------------------------------------------------

def replace_modules(model: torch.nn.Module,
                    fn: Callable[[str, torch.nn.Module], torch.nn.Module | None],
                    ) -> torch.nn.Module:
    """Replace modules of model in place: fn(name, module) returns a replacement or None.

    Visits model first (name ""), then its children by their dotted names; a replaced module's
    children are not visited. Returns model, or fn's replacement when it replaced model itself.
    """

    def visit(module: torch.nn.Module, name: str) -> torch.nn.Module:
        replacement = fn(name, module)
        if replacement is not None:
            return replacement
        for child_name, child in module.named_children():
            new = visit(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return visit(model, "")


_Module = TypeVar("_Module", bound=torch.nn.Module)


def swap_class(module: torch.nn.Module, cls: type[_Module]) -> _Module:
    """A module of class cls with module's state: the very same Parameter and buffer objects
    (optimizers, parameter hooks and tied weights keep pointing at the live tensors), its
    forward, pre-forward, backward and state_dict hooks, and its instance attributes."""
    swapped = cls.__new__(cls)
    for key, value in module.__dict__.items():
        if key == "__module__":  # our fx-leaf marker: set below for our classes only
            continue
        swapped.__dict__[key] = (value.copy() if isinstance(value, dict | set) else value)
    if issubclass(cls, _BatchNorm):
        object.__setattr__(swapped, "__module__", "torch.nn-compatible:batchnorm.nn")
    return swapped
