"""Shared test helpers: the tolerance table, one comparison of two results, one input builder,
one forward + gradients comparison for a batch-norm case, and the dispatch mode that says which
operators ran (so a test reads the route taken instead of assuming it)."""

import math
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm.layout import stat_dtype

# Absolute/relative tolerances by dtype, for outputs of order 1 (normalized values, gradients of
# normalized values). Reductions scale the error with sqrt(count): see tolerance().
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerance(dtype: torch.dtype, reduction_size: int = 1) -> dict[str, float]:
    """atol/rtol for a result of `dtype` that sums `reduction_size` terms."""
    atol, rtol = TOLERANCES[dtype]
    growth = max(1.0, math.sqrt(reduction_size) / 8)
    return {"atol": atol * growth, "rtol": rtol * growth}


def assert_close(actual, expected, dtype, reduction_size=1, what=""):
    """Compare in float64 with the dtype's tolerance, which grows with the number of terms a
    result sums (reduction_size); the message says what differed. Tensors (detached) or NumPy
    arrays (the reference's results)."""
    tol = tolerance(dtype, reduction_size)
    actual, expected = (torch.as_tensor(t).detach().double() for t in (actual, expected))
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """'contiguous', 'channels_last' (4D/5D) or 'noncontiguous' (a strided view, same values)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "noncontiguous":
        # Every other element of a wider tensor along the last axis: same values, odd strides.
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)
        view = wide[..., 0]
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)


def channels_last_kept(y: torch.Tensor) -> bool:
    fmt = torch.channels_last if y.dim() == 4 else torch.channels_last_3d
    return y.is_contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------
# One input builder, one forward + gradients comparison
# ---------------------------------------------------------------------------------------------


class Inputs(NamedTuple):
    """A batch-norm case's tensors: x, dy and residual (N, C, *) in `dtype` and layout; weight
    and bias (C,) in `dtype`; mean and invstd (C,) in the statistics dtype (float32 for half)."""

    x: torch.Tensor
    dy: torch.Tensor
    residual: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor


def make_inputs(shape, dtype=torch.float32, layout="contiguous", seed=0, *, scale=2.0,
                offset=1.0, device="cpu") -> Inputs:
    """Seeded float64 values rounded to `dtype`. Channel c of x is offset + scale * (shift_c +
    spread_c * z), shift_c from -1 to 1 and spread_c from 1 to 2 across channels, so a mix-up of
    channels changes the result; mean sits near x's mean, invstd in [0.5, 1.5), weight in
    [0.5, 1.5) (away from 0), bias, dy and residual standard normal."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    shift = torch.linspace(-1, 1, C, dtype=torch.float64).view(view)
    spread = torch.linspace(1, 2, C, dtype=torch.float64).view(view)

    def full(values):  # (N, C, *) in dtype and layout
        return to_layout(values.to(dtype).to(device), layout)

    def per_channel(values, to=dtype):  # (C,)
        return values.to(to).to(device)

    x = offset + scale * (shift + spread * torch.randn(shape, generator=g, dtype=torch.float64))
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    residual = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    mean = offset + scale * (shift.flatten() + 0.5 * torch.randn(C, generator=g,
                                                                 dtype=torch.float64))
    invstd = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    acc = stat_dtype(dtype)
    return Inputs(full(x), full(dy), full(residual), per_channel(weight), per_channel(bias),
                  per_channel(mean, acc), per_channel(invstd, acc))


def parameter_pairs(ours, theirs):
    """(name, ours' parameter, theirs' parameter) for two modules with the same parameters."""
    pairs = zip(ours.named_parameters(), theirs.named_parameters(), strict=True)
    return [(name, a, b) for (name, a), (_, b) in pairs]


def _keeps_layout(result, like, what):
    if like.dim() in (4, 5) and channels_last_kept(like) and not like.is_contiguous():
        assert channels_last_kept(result), f"{what}: channels-last layout not kept"


def check_forward_backward(ours, theirs, inputs, dtype, *, reduction_size=1, dy=None,
                           params=(), what="") -> tuple[torch.Tensor, torch.Tensor]:
    """tinygrad's helper_test_op for this library: `ours` on leaf views of `inputs` (a dict of
    named tensors, passed positionally in order, layouts kept) and `theirs` on float64 copies;
    compares the outputs, then the gradient, for the upstream gradient dy (default: seeded
    standard normal values in the output's dtype, the same for both), of every input and of each
    (name, ours' parameter, theirs' parameter) in `params`. Gradients must have their tensor's
    dtype; channels-last inputs must give channels-last outputs and gradients. Outputs use
    `dtype`'s tolerance, gradients that tolerance grown for `reduction_size` summed terms (the
    values per channel). Messages say `what` case, which tensor and how it differed. Returns
    (output, reference output)."""
    leaves = {name: t.detach().requires_grad_(t.is_floating_point()) for name, t in
              inputs.items()}
    leaves_ref = {name: t.detach().double().requires_grad_(t.is_floating_point()) for name, t in
                  inputs.items()}
    where = f"{what}: " if what else ""
    y = ours(*leaves.values())
    y_ref = theirs(*leaves_ref.values())
    assert y.shape == y_ref.shape, f"{where}output shape {tuple(y.shape)}, not {tuple(y_ref.shape)}"
    assert_close(y, y_ref, dtype, 1, f"{where}output")
    first = next(iter(inputs.values()))
    _keeps_layout(y, first, f"{where}output")

    if dy is None:
        g = torch.Generator().manual_seed(1234)
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).to(y.device)
    dy = dy.to(y.dtype)
    names = [n for n, t in leaves.items() if t.requires_grad] + [p[0] for p in params]
    wrt = [t for t in leaves.values() if t.requires_grad] + [p[1] for p in params]
    wrt_ref = [t for t in leaves_ref.values() if t.requires_grad] + [p[2] for p in params]
    grads = torch.autograd.grad(y, wrt, dy, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, wrt_ref, dy.double(), allow_unused=True)
    for name, t, grad, grad_ref in zip(names, wrt, grads, grads_ref, strict=True):
        # an input the output does not depend on: no gradient, or zeros, on both sides
        grad = torch.zeros_like(t) if grad is None else grad
        grad_ref = torch.zeros_like(t, dtype=torch.float64) if grad_ref is None else grad_ref
        assert grad.dtype == t.dtype, f"{where}grad of {name} is {grad.dtype}, not {t.dtype}"
        assert_close(grad, grad_ref, dtype, reduction_size, f"{where}grad of {name}")
        _keeps_layout(grad, t, f"{where}grad of {name}")
    return y, y_ref


class Dispatched(TorchDispatchMode):
    """The operator namespaces dispatched while active: 'batchnorm' (our ops) and 'aten'."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))
