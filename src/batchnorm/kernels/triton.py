"""Triton kernels: the CUDA implementation of the four batch-norm primitives.

Same functions, arguments and results as kernels/composite.py (the contract); the @triton.jit
kernels live in kernels/_triton_kernels.py. Batch norm is memory-bound, so the design counts
bytes: each primitive reads its inputs once and writes its outputs once, in one kernel (plus
a tiny combine kernel when a reduction is split).

Layouts. A dense (N, C, *) input is one of two row-major matrices (S = the spatial size):

    contiguous (NCHW)   (N*C, S):  a channel is N runs of S contiguous elements
    channels_last       (N*S, C):  a row holds every channel of one pixel

(S == 1, e.g. BatchNorm1d on (N, C), is both; it takes the channels_last kernels.)

Reductions (stats, backward_reduce) are split reductions:

    NCHW           grid (C, splits). A program owns one channel and a contiguous range of
                   (BLOCK_N, BLOCK_S) tiles over (samples, spatial); BLOCK_S = the power of 2
                   that pads S least (56x56 -> 64, no idle lane), BLOCK_N fills the rest of
                   the tile, so a 7x7 map still loads a thousand elements per tile.
    channels_last  grid (C / BLOCK_C, splits). A program owns BLOCK_C channels and a contiguous
                   range of (BLOCK_R, BLOCK_C) row tiles; each tile row is one coalesced segment.

    splits is chosen so that programs ~= 4 x the GPU's multiprocessors (enough loads in flight
    to saturate HBM); when C alone fills the GPU there is one split and the reduction kernel
    writes the result itself. Otherwise every program writes a partial at [split, channel]
    and a second, tiny kernel combines the (splits, C) partials.

    stats is numerically stable in float32: the data is shifted by the channel's first element,
    each tile is reduced in two passes over registers (tile mean, then squared deviations from
    it) and tiles and splits are merged by Chan's parallel formula (count, mean, M2). Sums of
    squares are never differenced, so mean 1e4 with unit variance normalizes within 1e-3 of
    float64. backward_reduce sums dy and dy * x_hat (already centred) in per-lane float32
    accumulators reduced once per program.

Elementwise passes (elemt, backward_elemt) tile the (R, K) matrix with (BLOCK_R, BLOCK_K)
tiles, one per program. The per-channel vectors are loaded per tile row (NCHW: channel =
row % C) or per tile column (channels_last: channel = column), never per element. elemt fuses
affine + residual + ReLU; both backward kernels recompute the ReLU mask from the saved output.

Every load is upcast to float32 at once; statistics are float32; stores cast to the output
dtype. Tile sizes are fixed by the shape (no autotuning: it would make the first call of every
shape slow and the interpreter cannot run multi-config autotune): tiles of up to 2048 elements,
8 per thread, which compile for sm_90 to under 100 registers, no spills, vectorized loads when
sizes are multiples of 16 (tests/test_kernels_triton.py compiles them without a GPU).
`tile_config` overrides the sizes; the tests use it to cross every block boundary with small
tensors. Launch plans are cached per shape, so the host work per call is a few dict lookups.

Performance status: designed for >= 85% of HBM bandwidth on the bytes its two passes move
(train forward 3n, forward+backward 8n, where the one-sweep limit is 2n and 5n) and >= 1.2x cuDNN
on ResNet-50's BN layers (`batchnorm bench --device cuda` measures both: "x roofline" and the
ResNet-50 totals); not yet measured on a GPU.

float64 is left to the composite fallback (DTYPES). Empty tensors, too.
"""

import contextlib
import dataclasses
import functools
import os
from typing import NamedTuple, overload

import torch
from torch import Tensor

from batchnorm.kernels import _triton_kernels as K
from batchnorm.kernels import composite

DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def available() -> bool:
    """True on a CUDA machine, or anywhere under TRITON_INTERPRET=1 (the tests' CPU interpreter)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Tile sizes and split counts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Upper bounds for the tiles (powers of two) and the number of programs a reduction aims for.

    target_programs=None means 4 programs per multiprocessor on a GPU, 1 on the interpreter.
    """

    reduce_tile: int = 2048  # elements per reduction tile: 8 per thread at 8 warps
    elementwise_tile: int = 2048  # elements per elementwise tile
    max_block_c: int = 64  # channels per channels_last tile
    combine_block: int = 64  # splits merged per step of a combine kernel
    target_programs: int | None = None

    def __post_init__(self):
        for name in ("reduce_tile", "elementwise_tile", "max_block_c", "combine_block"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {value}")
        if self.target_programs is not None and self.target_programs < 1:
            raise ValueError(
                f"TileConfig.target_programs must be >= 1 or None, got {self.target_programs}")


_config = TileConfig()


@contextlib.contextmanager
def tile_config(**overrides):
    """Other tile sizes for the duration: tile_config(reduce_tile=16, target_programs=64)."""
    global _config
    previous, _config = _config, dataclasses.replace(_config, **overrides)
    try:
        yield _config
    finally:
        _config = previous


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if _config.target_programs is not None:
        return _config.target_programs
    if device.type == "cuda":
        return 4 * _multiprocessors(device.index if device.index is not None else 0)
    return 1  # interpreter: programs run one after another anyway


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_most(n: int, limit: int) -> int:
    """The next power of two >= n, capped at limit (plain Python: triton's helpers are slow)."""
    return min(1 << (max(n, 1) - 1).bit_length(), limit)


def _spatial_block(S: int, limit: int) -> int:
    """BLOCK_S for rows of S contiguous elements: the power of two (>= 32, <= limit) that pads
    S least, the widest among equals. 56x56 = 3136 takes 256 (94% of lanes busy; 2048 would
    leave 23% idle); rows stay >= 32 elements, whole 32-byte sectors.
    """
    widest = _pow2_at_most(S, limit)
    best, best_padded = widest, _cdiv(S, widest) * widest
    block = widest // 2
    while block >= 32:
        padded = _cdiv(S, block) * block
        if padded < best_padded:
            best, best_padded = block, padded
        block //= 2
    return best


def _warps(tile: int) -> int:
    """8 elements per thread for full tiles (two 16-byte fp32 loads, one fp16 load)."""
    return 8 if tile >= 2048 else 4


def _splits(num_tiles: int, programs_per_split: int, target_programs: int) -> tuple[int, int]:
    """(splits, tiles_per_split): split each reduction so that all programs ~= the target."""
    wanted = max(1, -(-target_programs // programs_per_split))
    tiles_per_split = -(-num_tiles // min(wanted, num_tiles))
    return -(-num_tiles // tiles_per_split), tiles_per_split


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _channels_last(x: Tensor) -> bool:
    """True when x is stored channel-fastest, (N, *, C) (1x1 maps and 2D inputs included)."""
    spatial = x.numel() // (x.shape[0] * x.shape[1])
    if x.is_contiguous():
        return spatial == 1
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _dense(input: Tensor) -> tuple[Tensor, bool]:
    """input as one of the two dense layouts, and whether it is channels_last."""
    if input.dim() < 2:
        raise ValueError("batch norm kernels expect an input of shape (N, C, *), got shape "
                         f"{tuple(input.shape)}")
    if _channels_last(input):
        return input, True
    return input.contiguous(), False


def _like(t: Tensor, input: Tensor, channels_last: bool, name: str) -> Tensor:
    """t (grad_out, residual, output) in input's layout, so one set of offsets serves both."""
    if t.shape != input.shape:
        raise ValueError(
            f"{name} must have the input's shape {tuple(input.shape)}, got {tuple(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device}, expected the input's device {input.device}")
    if not channels_last or t.dim() < 4 or t.numel() // (t.shape[0] * t.shape[1]) == 1:
        return t.contiguous()
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


@overload
def _channel_vector(t: Tensor, C: int, name: str) -> Tensor: ...
@overload
def _channel_vector(t: None, C: int, name: str) -> None: ...
@overload
def _channel_vector(t: Tensor | None, C: int, name: str) -> Tensor | None: ...
def _channel_vector(t: Tensor | None, C: int, name: str) -> Tensor | None:
    if t is None:
        return None
    if t.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got "
                         f"{tuple(t.shape)}")
    return t.contiguous()


def _sizes(x: Tensor) -> tuple[int, int, int]:
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // (N * C)


def _empty(x: Tensor) -> bool:
    return x.numel() == 0


def _on_input_device(position: int):
    """Launch on the input's GPU: Triton launches on the current device, maybe another one."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            input = kwargs["input"] if "input" in kwargs else args[position]
            if not input.is_cuda:  # the interpreter, on CPU tensors
                return fn(*args, **kwargs)
            with torch.cuda.device(input.device):
                return fn(*args, **kwargs)

        return run

    return decorate


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


class _ReducePlan(NamedTuple):
    """How a per-channel reduction is launched; stats and backward_reduce share it."""

    grid: tuple[int, int]  # (channels or channel blocks, splits)
    geometry: dict  # the reduction kernel's size, tile and warp arguments
    splits: int
    shift_stride: int  # x[0, c, 0...] is at c * shift_stride (stats' shift)
    combine_grid: tuple[int]
    combine_blocks: dict  # BLOCK_P, BLOCK_C of the combine kernels


@functools.lru_cache(maxsize=4096)
def _reduce_plan(N: int, C: int, S: int, channels_last: bool, target_programs: int,
                 config: TileConfig) -> _ReducePlan:
    if channels_last:
        R = N * S
        block_c = _pow2_at_most(C, config.max_block_c)
        block_r = _pow2_at_most(R, max(1, config.reduce_tile // block_c))
        num_tiles = _cdiv(R, block_r)
        channel_programs = _cdiv(C, block_c)
        geometry = dict(R=R, C=C, BLOCK_R=block_r, BLOCK_C=block_c)
        tile, shift_stride = block_r * block_c, 1
    else:
        block_s = _spatial_block(S, config.reduce_tile)
        block_n = _pow2_at_most(N, max(1, config.reduce_tile // block_s))
        tiles_s = _cdiv(S, block_s)
        num_tiles = _cdiv(N, block_n) * tiles_s
        channel_programs = C
        geometry = dict(N=N, C=C, S=S, tiles_s=tiles_s, BLOCK_N=block_n, BLOCK_S=block_s)
        tile, shift_stride = block_n * block_s, S
    splits, tiles_per_split = _splits(num_tiles, channel_programs, target_programs)
    geometry.update(num_tiles=num_tiles, tiles_per_split=tiles_per_split,
                    num_warps=_warps(tile))
    block_c = _pow2_at_most(C, 32)
    return _ReducePlan(
        grid=(channel_programs, splits), geometry=geometry, splits=splits,
        shift_stride=shift_stride, combine_grid=(_cdiv(C, block_c),),
        combine_blocks=dict(BLOCK_P=_pow2_at_most(splits, config.combine_block), BLOCK_C=block_c))


def _plan_for(x: Tensor, channels_last: bool) -> _ReducePlan:
    N, C, S = _sizes(x)
    return _reduce_plan(N, C, S, channels_last, _target_programs(x.device), _config)


@_on_input_device(0)
def stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((x - mean)^2), float32, over every axis but dim 1."""
    if _empty(input):
        return composite.stats(input)
    x, channels_last = _dense(input)
    C = x.shape[1]
    plan = _plan_for(x, channels_last)
    kernel = K._stats_cl_kernel if channels_last else K._stats_nchw_kernel
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    m2 = torch.empty(C, device=x.device, dtype=torch.float32)
    if plan.splits == 1:  # the reduction kernel writes the result
        kernel[plan.grid](x, mean, m2, mean, FINAL=True, **plan.geometry)
        return mean, m2
    count_p, mean_p, m2_p = (torch.empty(plan.splits, C, device=x.device, dtype=torch.float32)
                             for _ in range(3))
    kernel[plan.grid](x, mean_p, m2_p, count_p, FINAL=False, **plan.geometry)
    K._stats_combine_kernel[plan.combine_grid](
        x, plan.shift_stride, count_p, mean_p, m2_p, mean, m2, C, plan.splits,
        **plan.combine_blocks)
    return mean, m2


# ---------------------------------------------------------------------------------------------
# elemt
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _elementwise_plan(N: int, C: int, S: int, channels_last: bool,
                      config: TileConfig) -> tuple[tuple[int], dict]:
    """(grid, kernel size/tile/warp arguments) for the (R, K) matrix view of an input."""
    R, K_ = (N * S, C) if channels_last else (N * C, S)
    if channels_last:
        block_k = _pow2_at_most(K_, min(config.max_block_c, config.elementwise_tile))
    else:
        block_k = _spatial_block(K_, config.elementwise_tile)
    block_r = _pow2_at_most(R, max(1, config.elementwise_tile // block_k))
    tiles_k = _cdiv(K_, block_k)
    geometry = dict(R=R, K=K_, C=C, tiles_k=tiles_k, CHANNEL_IS_COLUMN=channels_last,
                    BLOCK_R=block_r, BLOCK_K=block_k, num_warps=_warps(block_r * block_k))
    return (_cdiv(R, block_r) * tiles_k,), geometry


@_on_input_device(0)
def elemt(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, then + residual, then ReLU, each if asked."""
    if _empty(input):
        return composite.elemt(input, mean, invstd, weight, bias, residual, relu)
    x, channels_last = _dense(input)
    C = x.shape[1]
    mean, invstd = _channel_vector(mean, C, "mean"), _channel_vector(invstd, C, "invstd")
    weight, bias = _channel_vector(weight, C, "weight"), _channel_vector(bias, C, "bias")
    if residual is not None:
        residual = _like(residual, x, channels_last, "residual")
    out = torch.empty_like(x)
    grid, geometry = _elementwise_plan(*_sizes(x), channels_last, _config)
    K._elemt_kernel[grid](
        x, out, mean, invstd,
        mean if weight is None else weight,  # never read without HAS_WEIGHT
        mean if bias is None else bias,
        x if residual is None else residual,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=bool(relu), **geometry)
    return out


# ---------------------------------------------------------------------------------------------
# backward_reduce
# ---------------------------------------------------------------------------------------------


@_on_input_device(1)
def backward_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, output: Tensor | None
) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * x_hat) per channel; dy masked by a fused ReLU."""
    if _empty(input):
        return composite.backward_reduce(grad_out, input, mean, invstd, output)
    x, channels_last = _dense(input)
    C = x.shape[1]
    grad_out = _like(grad_out, x, channels_last, "grad_out")
    if output is not None:
        output = _like(output, x, channels_last, "output")
    mean, invstd = _channel_vector(mean, C, "mean"), _channel_vector(invstd, C, "invstd")
    plan = _plan_for(x, channels_last)
    kernel = K._grad_sums_cl_kernel if channels_last else K._grad_sums_nchw_kernel
    # with one split, the partials are the result
    sum_dy_p, sum_dy_xhat_p = (torch.empty(plan.splits, C, device=x.device, dtype=torch.float32)
                               for _ in range(2))
    kernel[plan.grid](grad_out, x, x if output is None else output, mean, invstd, sum_dy_p,
                      sum_dy_xhat_p, HAS_OUTPUT=output is not None, **plan.geometry)
    if plan.splits == 1:
        return sum_dy_p[0], sum_dy_xhat_p[0]
    sum_dy = torch.empty(C, device=x.device, dtype=torch.float32)
    sum_dy_xhat = torch.empty(C, device=x.device, dtype=torch.float32)
    K._sums_combine_kernel[plan.combine_grid](
        sum_dy_p, sum_dy_xhat_p, sum_dy, sum_dy_xhat, C, plan.splits, **plan.combine_blocks)
    return sum_dy, sum_dy_xhat


# ---------------------------------------------------------------------------------------------
# backward_elemt
# ---------------------------------------------------------------------------------------------


@_on_input_device(1)
def backward_elemt(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
    output: Tensor | None,
) -> Tensor:
    """grad_input = (dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight."""
    if _empty(input):
        return composite.backward_elemt(grad_out, input, mean, invstd, weight, mean_dy,
                                        mean_dy_xhat, output)
    x, channels_last = _dense(input)
    C = x.shape[1]
    grad_out = _like(grad_out, x, channels_last, "grad_out")
    if output is not None:
        output = _like(output, x, channels_last, "output")
    mean, invstd = _channel_vector(mean, C, "mean"), _channel_vector(invstd, C, "invstd")
    weight = _channel_vector(weight, C, "weight")
    mean_dy = _channel_vector(mean_dy, C, "mean_dy")
    mean_dy_xhat = _channel_vector(mean_dy_xhat, C, "mean_dy_xhat")
    grad_input = torch.empty_like(x)
    grid, geometry = _elementwise_plan(*_sizes(x), channels_last, _config)
    K._backward_elemt_kernel[grid](
        grad_out, x, x if output is None else output, grad_input,
        mean, invstd, mean if weight is None else weight, mean_dy, mean_dy_xhat,
        HAS_WEIGHT=weight is not None, HAS_OUTPUT=output is not None, **geometry)
    return grad_input
