"""The @triton.jit kernels behind kernels/triton.py (which documents the design and launches them).

Two memory layouts, each seen as a row-major matrix:

    contiguous (NCHW)   (N*C rows, S cols), S = H*W: row n*C + c holds channel c of sample n
    channels_last       (N*S rows, C cols): row n*S + s holds every channel of one pixel

Every load is upcast to float32 right away (fp16/bf16 arithmetic is never done in the input
dtype), every statistic and sum is float32, every store casts to the destination's dtype.
Row indices and offsets are int64, so tensors past 2**31 elements (and rows) work.
"""

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel update: (count, mean, M2) of two groups -> of their union.

    Stable: it adds deviations between means, never differences of large squared sums. An
    empty group (count 0) leaves the other unchanged.
    """
    count = count_a + count_b
    delta = mean_b - mean_a
    fraction_b = count_b / tl.maximum(count, 1.0)
    mean = mean_a + delta * fraction_b
    m2 = m2_a + m2_b + delta * delta * count_a * fraction_b
    return count, mean, m2


# ---------------------------------------------------------------------------------------------
# stats: per-channel (count, mean, M2)
#
# A program owns one channel (NCHW) or BLOCK_C channels (channels_last) and a contiguous range
# of tiles. Per tile: two passes over registers (tile mean, then squared deviations from it),
# merged into the program's running (count, mean, M2) by Chan's formula. The data is shifted by
# the channel's first element before anything is summed, so a mean of 1e4 next to a standard
# deviation of 1 costs no digits in float32 sums. FINAL (one program per channel) writes mean
# and M2; otherwise the program writes its partial (count, shifted mean, M2) at [split, channel]
# and _stats_combine_kernel merges the splits.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _stats_nchw_kernel(
    x_ptr, mean_ptr, m2_ptr, count_ptr,
    N, C, S, tiles_s, num_tiles, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FINAL: tl.constexpr,
):
    c = tl.program_id(0)
    split = tl.program_id(1)
    shift = tl.load(x_ptr + c.to(tl.int64) * S).to(tl.float32)  # x[0, c, 0]
    n_offsets = tl.arange(0, BLOCK_N)
    s_offsets = tl.arange(0, BLOCK_S)
    count = tl.zeros([1], dtype=tl.float32)
    mean = tl.zeros([1], dtype=tl.float32)
    m2 = tl.zeros([1], dtype=tl.float32)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    for tile in range(tile_start, tile_end):
        n0 = (tile // tiles_s) * BLOCK_N
        s0 = (tile % tiles_s) * BLOCK_S
        n = n0 + n_offsets
        s = s0 + s_offsets
        mask = (n < N)[:, None] & (s < S)[None, :]
        rows = (n.to(tl.int64) * C + c) * S  # (BLOCK_N,) start of row (n, c)
        x = tl.load(x_ptr + rows[:, None] + s[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)  # (BLOCK_N, BLOCK_S), shifted, zero outside
        tile_count = (tl.minimum(N - n0, BLOCK_N) * tl.minimum(S - s0, BLOCK_S)).to(tl.float32)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tile_count
        deviation = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(deviation * deviation, axis=1), axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    one = tl.arange(0, 1)
    if FINAL:
        tl.store(mean_ptr + c + one, mean + shift)
        tl.store(m2_ptr + c + one, m2)
    else:
        at = split * C + c + one
        tl.store(count_ptr + at, count)
        tl.store(mean_ptr + at, mean)
        tl.store(m2_ptr + at, m2)


@triton.jit
def _stats_cl_kernel(
    x_ptr, mean_ptr, m2_ptr, count_ptr,
    R, C, num_tiles, tiles_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_mask = c < C
    shift = tl.load(x_ptr + c, mask=c_mask, other=0.0).to(tl.float32)  # row 0: x[0, c, 0, 0]
    r_offsets = tl.arange(0, BLOCK_R)
    count = tl.zeros([1], dtype=tl.float32)  # the same for every channel
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    for tile in range(tile_start, tile_end):
        r0 = tl.cast(tile, tl.int64) * BLOCK_R  # rows = N * S may pass 2**31
        r = r0 + r_offsets
        mask = (r < R)[:, None] & c_mask[None, :]
        offsets = r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)  # (BLOCK_R, BLOCK_C)
        tile_count = tl.minimum(R - r0, BLOCK_R).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / tile_count  # (BLOCK_C,)
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    if FINAL:
        tl.store(mean_ptr + c, mean + shift, mask=c_mask)
        tl.store(m2_ptr + c, m2, mask=c_mask)
    else:
        at = split * C + c
        tl.store(count_ptr + at, count + tl.zeros([BLOCK_C], dtype=tl.float32), mask=c_mask)
        tl.store(mean_ptr + at, mean, mask=c_mask)
        tl.store(m2_ptr + at, m2, mask=c_mask)


@triton.jit
def _stats_combine_kernel(
    x_ptr, shift_stride, count_ptr, partial_mean_ptr, partial_m2_ptr, mean_ptr, m2_ptr,
    C, num_splits,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the (num_splits, C) partials of one block of channels; add the shift back."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < num_splits)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        n = tl.load(count_ptr + offsets, mask=mask, other=0.0)  # (BLOCK_P, BLOCK_C)
        mu = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
        q = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0)
        # Chan's formula for BLOCK_P groups at once: M2 = sum M2_i + sum n_i (mean_i - mean)^2
        block_count = tl.sum(n, axis=0)
        block_mean = tl.sum(n * mu, axis=0) / tl.maximum(block_count, 1.0)
        spread = mu - block_mean[None, :]
        block_m2 = tl.sum(q + n * spread * spread, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    shift = tl.load(x_ptr + c.to(tl.int64) * shift_stride, mask=c_mask, other=0.0)
    tl.store(mean_ptr + c, mean + shift.to(tl.float32), mask=c_mask)
    tl.store(m2_ptr + c, m2, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# backward_reduce: per-channel sum(dy) and sum(dy * x_hat), dy masked by a fused ReLU's output
#
# Same programs as stats; plain float32 sums suffice (x_hat is centred). Each lane of the tile
# accumulates across tiles and the tile is reduced once at the end. A program writes its sums
# at [split, channel]: with one split that is the result, otherwise _sums_combine_kernel adds
# the splits.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grad_sums_nchw_kernel(
    grad_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    N, C, S, tiles_s, num_tiles, tiles_per_split,
    HAS_OUTPUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c = tl.program_id(0)
    split = tl.program_id(1)
    mean = tl.load(mean_ptr + c).to(tl.float32)
    invstd = tl.load(invstd_ptr + c).to(tl.float32)
    n_offsets = tl.arange(0, BLOCK_N)
    s_offsets = tl.arange(0, BLOCK_S)
    acc_dy = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    acc_dy_xhat = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    for tile in range(tile_start, tile_end):
        n = (tile // tiles_s) * BLOCK_N + n_offsets
        s = (tile % tiles_s) * BLOCK_S + s_offsets
        mask = (n < N)[:, None] & (s < S)[None, :]
        offsets = ((n.to(tl.int64) * C + c) * S)[:, None] + s[None, :]
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_OUTPUT:
            y = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.where(y > 0, dy, 0.0)  # the ReLU's gradient mask
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x_hat = (x - mean) * invstd
        acc_dy += dy  # dy is 0 outside the mask, so x_hat there does not matter
        acc_dy_xhat += dy * x_hat
    one = tl.arange(0, 1)
    at = split * C + c + one
    tl.store(sum_dy_ptr + at, tl.sum(tl.sum(acc_dy, axis=1), axis=0) + tl.zeros([1], tl.float32))
    tl.store(sum_dy_xhat_ptr + at,
             tl.sum(tl.sum(acc_dy_xhat, axis=1), axis=0) + tl.zeros([1], tl.float32))


@triton.jit
def _grad_sums_cl_kernel(
    grad_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    R, C, num_tiles, tiles_per_split,
    HAS_OUTPUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    r_offsets = tl.arange(0, BLOCK_R)
    acc_dy = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_dy_xhat = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    for tile in range(tile_start, tile_end):
        r = tl.cast(tile, tl.int64) * BLOCK_R + r_offsets
        mask = (r < R)[:, None] & c_mask[None, :]
        offsets = r[:, None] * C + c[None, :]
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_OUTPUT:
            y = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.where(y > 0, dy, 0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x_hat = (x - mean[None, :]) * invstd[None, :]
        acc_dy += dy
        acc_dy_xhat += dy * x_hat
    at = split * C + c
    tl.store(sum_dy_ptr + at, tl.sum(acc_dy, axis=0), mask=c_mask)
    tl.store(sum_dy_xhat_ptr + at, tl.sum(acc_dy_xhat, axis=0), mask=c_mask)


@triton.jit
def _sums_combine_kernel(
    partial_a_ptr, partial_b_ptr, a_ptr, b_ptr, C, num_splits,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """a[c] = sum over splits of partial_a[split, c]; the same for b."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < num_splits)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        a += tl.sum(tl.load(partial_a_ptr + offsets, mask=mask, other=0.0), axis=0)
        b += tl.sum(tl.load(partial_b_ptr + offsets, mask=mask, other=0.0), axis=0)
    tl.store(a_ptr + c, a, mask=c_mask)
    tl.store(b_ptr + c, b, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Elementwise passes over a (R, K) row-major matrix, tiles of (BLOCK_R, BLOCK_K), one tile per
# program. The channel of an element is its column (channels_last) or its row modulo C (NCHW):
# per-channel vectors are loaded once per tile row or column, never per element.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(R, K, tiles_k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile: row and column indices, the in-bounds mask, int64 offsets."""
    pid = tl.program_id(0)
    r = (pid // tiles_k).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # R may pass 2**31
    k = (pid % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < R)[:, None] & (k < K)[None, :]
    offsets = r[:, None] * K + k[None, :]
    return r, k, mask, offsets


@triton.jit
def _load_channel(ptr, r, k, R, K, C, CHANNEL_IS_COLUMN: tl.constexpr):
    """A per-channel float32 vector broadcast to the tile: (1, BLOCK_K) or (BLOCK_R, 1)."""
    if CHANNEL_IS_COLUMN:
        values = tl.load(ptr + k, mask=k < K, other=0.0).to(tl.float32)
        result = values[None, :]
    else:
        values = tl.load(ptr + r % C, mask=r < R, other=0.0).to(tl.float32)
        result = values[:, None]
    return result


@triton.jit
def _elemt_kernel(
    x_ptr, out_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, residual_ptr,
    R, K, C, tiles_k,
    CHANNEL_IS_COLUMN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = (x - mean) * invstd * weight + bias [+ residual] [ReLU]."""
    r, k, mask, offsets = _tile(R, K, tiles_k, BLOCK_R, BLOCK_K)
    mean = _load_channel(mean_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    scale = _load_channel(invstd_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    if HAS_WEIGHT:
        scale = scale * _load_channel(weight_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * scale  # x - mean first: exact when |mean| >> std
    if HAS_BIAS:
        y = y + _load_channel(bias_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_elemt_kernel(
    grad_ptr, x_ptr, out_ptr, grad_input_ptr,
    mean_ptr, invstd_ptr, weight_ptr, mean_dy_ptr, mean_dy_xhat_ptr,
    R, K, C, tiles_k,
    CHANNEL_IS_COLUMN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_OUTPUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = (dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight, dy masked by output > 0."""
    r, k, mask, offsets = _tile(R, K, tiles_k, BLOCK_R, BLOCK_K)
    mean = _load_channel(mean_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    invstd = _load_channel(invstd_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    mean_dy = _load_channel(mean_dy_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    mean_dy_xhat = _load_channel(mean_dy_xhat_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * _load_channel(weight_ptr, r, k, R, K, C, CHANNEL_IS_COLUMN)
    dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_OUTPUT:
        y = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.where(y > 0, dy, 0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean) * invstd
    dx = (dy - mean_dy - x_hat * mean_dy_xhat) * scale
    tl.store(grad_input_ptr + offsets, dx.to(grad_input_ptr.dtype.element_ty), mask=mask)
