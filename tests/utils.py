"""Shared test helpers: the tolerance table and one comparison for a batch-norm case."""

import math

import torch

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
