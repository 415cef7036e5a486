"""What `batchnorm bench` measures: the modes, the shapes, the providers, and the check that runs
before any timing.

A case is one (shape, layout, dtype, mode) on one device. Each provider turns it into a
no-argument callable that does the mode's work once and returns its results: (y,) for a forward
mode, (y, d input, d weight, d bias[, d residual]) for a forward+backward mode. The same
callable is timed and verified, so what is checked is what is measured.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from batchnorm import functional

MOMENTUM, EPS = 0.1, 1e-5


class Mode(NamedTuple):
    training: bool
    backward: bool
    relu: bool  # BN, then ReLU (fused by ours)
    residual: bool  # BN, + residual, then ReLU: a ResNet block's second BN
    bytes_per_element: int  # the one-sweep limit, in units of the input's size


# The roofline: the bytes a mode must move at the least, each full-size tensor read or written
# once. forward: x, y. backward: x, dy, dx; a fused ReLU's backward reads y for its mask; a
# residual is read in the forward and its gradient written in the backward.
MODE_TABLE = {
    "train-fwd": Mode(training=True, backward=False, relu=False, residual=False,
                      bytes_per_element=2),
    "train-fwd-bwd": Mode(training=True, backward=True, relu=False, residual=False,
                          bytes_per_element=5),
    "eval-fwd": Mode(training=False, backward=False, relu=False, residual=False,
                     bytes_per_element=2),
    "relu-fwd-bwd": Mode(training=True, backward=True, relu=True, residual=False,
                         bytes_per_element=6),
    "add-relu-fwd-bwd": Mode(training=True, backward=True, relu=True, residual=True,
                             bytes_per_element=8),
}
MODES = ["train-fwd", "train-fwd-bwd", "eval-fwd", "relu-fwd-bwd"]  # the default on every device

# (C, H, W) of ResNet-50's (torchvision, v1.5) BatchNorm2d inputs at 224x224, and how many of its
# 53 BN layers have that shape: the weights of the totals.
RESNET50_BN = {
    (64, 112, 112): 1, (64, 56, 56): 6, (256, 56, 56): 4, (128, 56, 56): 1, (128, 28, 28): 7,
    (512, 28, 28): 5, (256, 28, 28): 1, (256, 14, 14): 11, (1024, 14, 14): 7, (512, 14, 14): 1,
    (512, 7, 7): 5, (2048, 7, 7): 4,
}

# Verification tolerances: the relative error in the 2-norm against float64 torch.nn, by dtype.
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# ReLU ties: an output within rounding of 0, clamped by one provider and not by the other, moves
# one element of dx and one channel's d weight by O(1); measured up to 3e-3 relative at 3M
# elements. A wrong kernel is off by O(1) relative.
RELU_GRADIENT_SLACK = 10


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


class Inputs(NamedTuple):
    x: Tensor
    weight: Tensor
    bias: Tensor
    grad: Tensor  # dy
    residual: Tensor


def make_inputs(shape, layout: str, dtype: torch.dtype, device: torch.device,
                backward: bool) -> Inputs:
    """Seeded inputs in the layout. Weight and bias are float32 for 16-bit inputs, as mixed
    precision keeps them (cuDNN serves only that combination)."""
    generator = torch.Generator().manual_seed(0)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def full_size():
        t = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        return to_layout(t, layout)

    C = shape[1]
    x, grad, residual = full_size(), full_size(), full_size()
    weight = torch.rand(C, generator=generator, dtype=param_dtype).add_(0.5).to(device)
    bias = torch.randn(C, generator=generator, dtype=param_dtype).to(device)
    return Inputs(x.requires_grad_(backward), weight.requires_grad_(), bias.requires_grad_(),
                  grad, residual.requires_grad_(backward))


def to_layout(x: Tensor, layout: str) -> Tensor:
    if layout == "contiguous":
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                        else torch.channels_last_3d)


def as_float64(inputs: Inputs) -> Inputs:
    """Float64 copies of the same values (the reference's inputs), same layout and leaves."""
    return Inputs(*(t.detach().double().requires_grad_(t.requires_grad) for t in inputs))


# ---------------------------------------------------------------------------------------------
# Providers: name -> (the callable for a case, the devices it serves)
# ---------------------------------------------------------------------------------------------


def torch_fused(x, running_mean, running_var, weight, bias, training, momentum, eps, *,
                residual=None, relu=False):
    """torch.nn's batch norm, then the residual and the ReLU, in functional.batch_norm's
    signature: what torch.compile compiles whole, and the reference."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def autograd_case(bn, fused: bool, mode: Mode, inputs: Inputs) -> Callable[[], tuple[Tensor, ...]]:
    """The mode through bn, which has F.batch_norm's signature and, when fused, also takes
    residual= and relu= (else the add and the ReLU follow in torch): under no_grad for a forward
    mode, else the forward and torch.autograd.grad. Running statistics of its own, updated in
    place as a training loop would."""
    x, weight, bias, grad = inputs[:4]
    C = x.shape[1]
    running_mean = torch.zeros(C, dtype=weight.dtype, device=x.device)
    running_var = torch.ones(C, dtype=weight.dtype, device=x.device)
    training, relu = mode.training, mode.relu
    residual = inputs.residual if mode.residual else None
    leaves = (x, weight, bias) + ((inputs.residual,) if mode.residual else ())

    def forward():
        if fused:
            return bn(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS,
                      residual=residual, relu=relu)
        y = bn(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    def results():
        if not mode.backward:
            with torch.no_grad():
                return (forward(),)
        y = forward()
        return (y, *torch.autograd.grad(y, leaves, grad))

    return results


def _kernels_case(mode: Mode, inputs: Inputs) -> Callable[[], tuple[Tensor, ...]]:
    """The Triton kernels called directly: the mode's work without dispatch or autograd (the
    kernels' own speed). The backward's per-channel sums are d bias and d weight; no d residual,
    so verification compares (y, d input, d weight, d bias)."""
    from batchnorm.kernels import triton as K

    x, weight, bias, grad = (t.detach() for t in inputs[:4])
    residual = inputs.residual.detach() if mode.residual else None
    count = x.numel() // x.shape[1]
    running_mean = torch.zeros(x.shape[1], device=x.device)
    running_var = torch.ones(x.shape[1], device=x.device)

    def results():
        if not mode.training:
            invstd = torch.rsqrt(running_var + EPS)
            return (K.elemt(x, running_mean, invstd, weight, bias, None, False),)
        mean, m2 = K.stats(x)
        invstd = torch.rsqrt(m2 / count + EPS)
        y = K.elemt(x, mean, invstd, weight, bias, residual, mode.relu)
        if not mode.backward:
            return (y,)
        mask = y if mode.relu else None
        sum_dy, sum_dy_xhat = K.backward_reduce(grad, x, mean, invstd, mask)
        grad_input = K.backward_elemt(grad, x, mean, invstd, weight, sum_dy / count,
                                      sum_dy_xhat / count, mask)
        return (y, grad_input, sum_dy_xhat, sum_dy)

    return results


def _compiled_case(mode: Mode, inputs: Inputs):
    # the whole torch expression, so Inductor may fuse the add and ReLU too; dynamic=False: one
    # graph per case (bench.timing.allow_recompiles keeps them all compiled)
    return autograd_case(torch.compile(torch_fused, dynamic=False), True, mode, inputs)


class Provider(NamedTuple):
    case: Callable[[Mode, Inputs], Callable[[], tuple[Tensor, ...]]]
    devices: tuple[str, ...]
    about: str


PROVIDERS = {
    "ours": Provider(lambda mode, inputs: autograd_case(functional.batch_norm, True, mode, inputs),
                     ("cpu", "cuda"), "batchnorm.functional.batch_norm, ReLU and residual fused"),
    # only in the ReLU modes, next to ours: what the fusion saves
    "ours-unfused": Provider(
        lambda mode, inputs: autograd_case(functional.batch_norm, False, mode, inputs),
        ("cpu", "cuda"), "ours, then torch's add and ReLU"),
    "ours-kernels": Provider(_kernels_case, ("cuda",), "the four Triton kernels called directly"),
    "torch": Provider(lambda mode, inputs: autograd_case(F.batch_norm, False, mode, inputs),
                      ("cpu", "cuda"), "torch.nn.functional (cuDNN on a GPU)"),
    "compile": Provider(_compiled_case, ("cpu", "cuda"), "torch.compile of the torch code"),
}


def provider_names(chosen: list[str], mode: Mode) -> list[str]:
    """The providers a mode's row times: ours-unfused right after ours in the ReLU modes only."""
    names = [name for name in chosen if name != "ours-unfused"]
    if mode.relu and "ours" in names:
        names.insert(names.index("ours") + 1, "ours-unfused")
    return names


# ---------------------------------------------------------------------------------------------
# Verification, before any timing, on every device
# ---------------------------------------------------------------------------------------------


def reference(mode: Mode, inputs: Inputs) -> tuple[Tensor, ...]:
    """torch.nn eager in float64 on float64 copies of the same inputs."""
    return autograd_case(torch_fused, True, mode, as_float64(inputs))()


def verify(got: tuple[Tensor, ...], expected: tuple[Tensor, ...], mode: Mode,
           dtype: torch.dtype) -> bool:
    """Every result within the dtype's tolerance of the reference. A provider may return a prefix
    of the reference's results (ours-kernels has no d residual), never more."""
    if not 0 < len(got) <= len(expected):
        return False
    slack = RELU_GRADIENT_SLACK if mode.relu else 1
    tolerances = [TOLERANCE[dtype]] + [TOLERANCE[dtype] * slack] * (len(got) - 1)
    return all(_close(g, e, tol) for g, e, tol in zip(got, expected, tolerances, strict=False))


def _close(got: Tensor, ref: Tensor, tol: float) -> bool:
    """Relative error in the 2-norm below tol.

    A norm, not elementwise: with a ReLU, an output within rounding of 0 may be clamped by one
    provider and not the other, which moves that element's gradient by O(1); a wrong kernel moves
    the whole tensor.
    """
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return False
    return bool((got - ref).norm() <= tol * max(ref.norm().item(), 1e-12))
