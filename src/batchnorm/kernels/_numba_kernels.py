"""numba kernels of the four batch-norm primitives, for kernels/cpu.py. No side effects at import.

A cached numba kernel re-imports this module when it is loaded from the cache, so this file only
defines functions: it registers no custom op and touches no global state (threading layer, thread
counts and allocation are cpu.py's business).

Two memory layouts cover every input cpu.py hands over:

    "ncs"  x is (N, C, S) C-contiguous: contiguous (N, C, *spatial) input, S = prod(spatial).
           Work is split into tasks of one piece of one (n, c) row: contiguous runs of S.
    "mc"   x is (M, C) C-contiguous: channels innermost. Channels-last (N, *spatial, C) input read
           in place (M = N * prod(spatial)) and (N, C) input (M = N). Work is split into blocks
           of rows; the inner loop runs over channels, so it vectorizes without gathers.

Both layouts split the work into many more tasks than threads, whatever the shape: (N, C) with
few channels and a big batch, one huge channel, 7x7 maps with 2048 channels.

Statistics are one pass over memory with shifted sums: per channel a shift K (the channel's first
element) and the sums of (x - K) and (x - K)^2. The textbook E[x^2] - E[x]^2 loses every digit
when |mean| >> std (float32, mean 1e4, std 1); with the shift the cancellation is only
((mean - K) / std)^2, a few units. Within a task the sums run in the input's precision (float32
vectors are twice as wide) over at most PIECE elements per accumulator; across tasks in float64.

fastmath is limited to reassociation and contraction (FMA): reductions vectorize, and NaN / Inf
still propagate (functional.py checks the statistics for non-finite values).
"""

import types

import numpy as np
from numba import njit, prange

# Elements per task (and per low-precision accumulator): 16 KiB of float32, well inside L1/L2.
PIECE = 4096
# (M, C) kernels: rows summed into the input-precision per-channel partials before they are added
# to the float64 block totals (each partial sums at most this many terms, fewer than PIECE).
# Flushing every PIECE // C rows instead cost a float64 pass over C per 4 rows: (256, 1024)
# stats took 119 us (copy: 42 us).
MC_FLUSH_ROWS = 256
_FASTMATH = {"reassoc", "contract"}


def _compile(function, parallel: bool):
    """njit `function`, cached when numba finds a writable cache directory, else uncached.

    The serial variant is a copy of the function under another name (`<name>_serial`) so that
    the two variants have separate cache entries.
    """
    name = function.__name__.lstrip("_") + ("" if parallel else "_serial")
    variant = types.FunctionType(function.__code__, function.__globals__, name,
                                 function.__defaults__, function.__closure__)
    variant.__qualname__ = name
    variant.__doc__ = function.__doc__
    options = dict(parallel=parallel, fastmath=_FASTMATH, nogil=True, error_model="numpy")
    try:
        return njit(cache=True, **options)(variant)
    except RuntimeError:  # "cannot cache function ...: no locator available": no writable dir
        return njit(cache=False, **options)(variant)


def _kernel(function):
    """The kernel in two variants: (parallel over the tasks, serial in the calling thread).

    Handing a prange to numba's workqueue threads costs 5-50 us (more on a loaded machine), so
    one-thread runs and small inputs take the serial variant (kernels/cpu.py chooses).
    """
    return _compile(function, parallel=True), _compile(function, parallel=False)


# ---------------------------------------------------------------------------------------------
# Work splitting (plain Python: the callers pass the sizes in)
# ---------------------------------------------------------------------------------------------


def ncs_pieces(N: int, C: int, S: int, tasks: int) -> int:
    """Piece length along S so that an (N, C, S) array gives >= `tasks` tasks of <= PIECE each."""
    pieces = max(-(-S // PIECE), -(-tasks // max(N * C, 1)))
    return max(-(-S // pieces), 1)


def mc_rows(M: int, C: int, tasks: int) -> int:
    """Rows per block so that an (M, C) array gives about `tasks` blocks (fewer when tiny)."""
    blocks = max(1, min(M, tasks, (M * C) // 1024))
    return -(-M // blocks)


# ---------------------------------------------------------------------------------------------
# stats: (x) -> per-channel mean, m2
# ---------------------------------------------------------------------------------------------


def _stats_ncs(x, piece, zero, mean, m2):
    """x (N, C, S); zero: a 0 of the accumulator type; writes mean (C,), m2 (C,) in float64."""
    N, C, S = x.shape
    P = (S + piece - 1) // piece
    sum1 = np.empty(N * C * P, np.float64)  # per task: sum(x - K), sum((x - K)^2)
    sum2 = np.empty(N * C * P, np.float64)
    # flat views of the (N, C, S) arrays
    xr = x.reshape(-1)
    for t in prange(N * C * P):
        row = t // P  # (n, c) row; c = row % C
        c = row % C
        offset = (t - row * P) * piece
        # flat, unsigned indices: no per-row views, no negative-index test (the loops vectorize)
        start = np.uint64(row * S + offset)
        end = np.uint64(row * S + min(S, offset + piece))
        shift = x[0, c, 0]
        s1 = zero
        s2 = zero
        for i in range(start, end):
            d = xr[i] - shift
            s1 += d
            s2 += d * d
        sum1[t] = s1
        sum2[t] = s2
    count = N * S
    for c in range(C):  # the merge is O(tasks * C): not worth a second parallel region
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            for p in range(P):
                t = (n * C + c) * P + p
                s1 += sum1[t]
                s2 += sum2[t]
        d_mean = s1 / count  # mean - K
        mean[c] = x[0, c, 0] + d_mean
        m2[c] = max(s2 - s1 * d_mean, 0.0)


def _stats_mc(x, rows, zero, mean, m2):
    """x (M, C); rows per block; same results as stats_ncs."""
    M, C = x.shape
    B = (M + rows - 1) // rows
    sum1 = np.zeros((B, C), np.float64)
    sum2 = np.zeros((B, C), np.float64)
    shift = x[0]
    for b in prange(B):
        start = b * rows
        end = min(M, start + rows)
        s1 = np.empty_like(shift)  # input-precision partials, flushed every PIECE // C rows
        s2 = np.empty_like(shift)
        step = MC_FLUSH_ROWS
        for r0 in range(start, end, step):
            s1[:] = zero
            s2[:] = zero
            r1 = min(end, r0 + step)
            r = r0
            while r + 4 <= r1:  # four rows per sweep: a quarter of the accumulator traffic
                x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
                for c in range(np.uint64(C)):
                    k = shift[c]
                    d0, d1, d2, d3 = x0[c] - k, x1[c] - k, x2[c] - k, x3[c] - k
                    s1[c] += (d0 + d1) + (d2 + d3)
                    s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                r += 4
            done = r
            for rr in range(done, r1):  # the 0-3 rows left
                xr = x[rr]
                for c in range(np.uint64(C)):
                    d = xr[c] - shift[c]
                    s1[c] += d
                    s2[c] += d * d
            for c in range(np.uint64(C)):
                sum1[b, c] += s1[c]
                sum2[b, c] += s2[c]
    for c in range(C):  # the merge is O(tasks * C): not worth a second parallel region
        s1c = 0.0
        s2c = 0.0
        for b in range(B):
            s1c += sum1[b, c]
            s2c += sum2[b, c]
        d_mean = s1c / M
        mean[c] = shift[c] + d_mean
        m2[c] = max(s2c - s1c * d_mean, 0.0)


# ---------------------------------------------------------------------------------------------
# elemt: y = (x - mean) * invstd * weight + bias [+ residual] [ReLU]
# ---------------------------------------------------------------------------------------------


def _elemt_ncs(x, mean, invstd, weight, bias, residual, has_residual, relu, piece, zero, out):
    """y = (x - mean) * (invstd * weight) + bias [+ residual] [ReLU]; x - mean first: stable."""
    N, C, S = x.shape
    P = (S + piece - 1) // piece
    # flat views of the (N, C, S) arrays
    xr = x.reshape(-1)
    yr = out.reshape(-1)
    rr = residual.reshape(-1)
    for t in prange(N * C * P):
        row = t // P  # (n, c) row; c = row % C
        c = row % C
        offset = (t - row * P) * piece
        # flat, unsigned indices: no per-row views, no negative-index test (the loops vectorize)
        start = np.uint64(row * S + offset)
        end = np.uint64(row * S + min(S, offset + piece))
        m = mean[c]
        a = invstd[c] * weight[c]
        b = bias[c]
        if has_residual:
            if relu:
                for i in range(start, end):
                    y = (xr[i] - m) * a + b + rr[i]
                    yr[i] = zero if y < 0 else y  # NaN passes through, as clamp_min
            else:
                for i in range(start, end):
                    yr[i] = (xr[i] - m) * a + b + rr[i]
        elif relu:
            for i in range(start, end):
                y = (xr[i] - m) * a + b
                yr[i] = zero if y < 0 else y
        else:
            for i in range(start, end):
                yr[i] = (xr[i] - m) * a + b


def _elemt_mc(x, mean, invstd, weight, bias, residual, has_residual, relu, rows, zero, out):
    M, C = x.shape
    B = (M + rows - 1) // rows
    scale = invstd * weight
    shift = bias
    for b in prange(B):
        for r in range(b * rows, min(M, b * rows + rows)):
            xr = x[r]
            yr = out[r]
            if has_residual:
                rr = residual[r]
                if relu:
                    for c in range(np.uint64(C)):
                        y = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c]
                        yr[c] = zero if y < 0 else y
                else:
                    for c in range(np.uint64(C)):
                        yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c]
            elif relu:
                for c in range(np.uint64(C)):
                    y = (xr[c] - mean[c]) * scale[c] + shift[c]
                    yr[c] = zero if y < 0 else y
            else:
                for c in range(np.uint64(C)):
                    yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c]


# ---------------------------------------------------------------------------------------------
# backward_reduce: sum(dy), sum(dy * (x - mean)); dy masked by output > 0 for a fused ReLU
# ---------------------------------------------------------------------------------------------


def _backward_reduce_ncs(dy, x, mean, invstd, output, relu, piece, zero, sum_dy, sum_dy_xhat):
    """Writes sum(dy) and sum(dy * x_hat) = invstd * sum(dy * (x - mean)) per channel."""
    N, C, S = x.shape
    P = (S + piece - 1) // piece
    part1 = np.empty(N * C * P, np.float64)
    part2 = np.empty(N * C * P, np.float64)
    # flat views of the (N, C, S) arrays
    xr = x.reshape(-1)
    gr = dy.reshape(-1)
    yr = output.reshape(-1)
    for t in prange(N * C * P):
        row = t // P  # (n, c) row; c = row % C
        c = row % C
        offset = (t - row * P) * piece
        # flat, unsigned indices: no per-row views, no negative-index test (the loops vectorize)
        start = np.uint64(row * S + offset)
        end = np.uint64(row * S + min(S, offset + piece))
        m = mean[c]
        s1 = zero
        s2 = zero
        if relu:
            for i in range(start, end):
                g = gr[i] if yr[i] > 0 else zero
                s1 += g
                s2 += g * (xr[i] - m)
        else:
            for i in range(start, end):
                g = gr[i]
                s1 += g
                s2 += g * (xr[i] - m)
        part1[t] = s1
        part2[t] = s2
    for c in range(C):  # the merge is O(tasks * C): not worth a second parallel region
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            for p in range(P):
                t = (n * C + c) * P + p
                s1 += part1[t]
                s2 += part2[t]
        sum_dy[c] = s1
        sum_dy_xhat[c] = s2 * invstd[c]


def _backward_reduce_mc(dy, x, mean, invstd, output, relu, rows, zero, sum_dy, sum_dy_xhat):
    M, C = x.shape
    B = (M + rows - 1) // rows
    part1 = np.zeros((B, C), np.float64)
    part2 = np.zeros((B, C), np.float64)
    for b in prange(B):
        start = b * rows
        end = min(M, start + rows)
        s1 = np.empty_like(x[0])
        s2 = np.empty_like(x[0])
        step = MC_FLUSH_ROWS
        for r0 in range(start, end, step):
            s1[:] = zero
            s2[:] = zero
            r1 = min(end, r0 + step)
            r = r0
            while not relu and r + 2 <= r1:  # two rows per sweep: half the accumulator traffic
                x0, x1, g0, g1 = x[r], x[r + 1], dy[r], dy[r + 1]
                for c in range(np.uint64(C)):
                    m = mean[c]
                    s1[c] += g0[c] + g1[c]
                    s2[c] += g0[c] * (x0[c] - m) + g1[c] * (x1[c] - m)
                r += 2
            done = r
            for rr in range(done, r1):  # the row left, or every row with relu
                xr = x[rr]
                gr = dy[rr]
                if relu:
                    yr = output[rr]
                    for c in range(np.uint64(C)):
                        g = gr[c] if yr[c] > 0 else zero
                        s1[c] += g
                        s2[c] += g * (xr[c] - mean[c])
                else:
                    for c in range(np.uint64(C)):
                        g = gr[c]
                        s1[c] += g
                        s2[c] += g * (xr[c] - mean[c])
            for c in range(np.uint64(C)):
                part1[b, c] += s1[c]
                part2[b, c] += s2[c]
    for c in range(C):  # the merge is O(tasks * C): not worth a second parallel region
        s1c = 0.0
        s2c = 0.0
        for b in range(B):
            s1c += part1[b, c]
            s2c += part2[b, c]
        sum_dy[c] = s1c
        sum_dy_xhat[c] = s2c * invstd[c]


# ---------------------------------------------------------------------------------------------
# backward_elemt: dx = (dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight
#                    = (dy - mean_dy) * k - (x - mean) * j,   k = invstd * weight,
#                      j = invstd^2 * weight * mean_dy_xhat  (dy masked for a fused ReLU)
# ---------------------------------------------------------------------------------------------


def _backward_elemt_ncs(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat, output, relu, piece,
                       zero, out):
    N, C, S = x.shape
    P = (S + piece - 1) // piece
    # flat views of the (N, C, S) arrays
    xr = x.reshape(-1)
    gr = dy.reshape(-1)
    dr = out.reshape(-1)
    yr = output.reshape(-1)
    for t in prange(N * C * P):
        row = t // P  # (n, c) row; c = row % C
        c = row % C
        offset = (t - row * P) * piece
        # flat, unsigned indices: no per-row views, no negative-index test (the loops vectorize)
        start = np.uint64(row * S + offset)
        end = np.uint64(row * S + min(S, offset + piece))
        m = mean[c]
        mdy = mean_dy[c]
        kc = invstd[c] * weight[c]
        jc = invstd[c] * kc * mean_dy_xhat[c]
        if relu:
            for i in range(start, end):
                g = gr[i] if yr[i] > 0 else zero
                dr[i] = (g - mdy) * kc - (xr[i] - m) * jc
        else:
            for i in range(start, end):
                dr[i] = (gr[i] - mdy) * kc - (xr[i] - m) * jc


def _backward_elemt_mc(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat, output, relu, rows,
                      zero, out):
    M, C = x.shape
    B = (M + rows - 1) // rows
    k = invstd * weight
    j = invstd * k * mean_dy_xhat
    for b in prange(B):
        for r in range(b * rows, min(M, b * rows + rows)):
            xr = x[r]
            gr = dy[r]
            dr = out[r]
            if relu:
                yr = output[r]
                for c in range(np.uint64(C)):
                    g = gr[c] if yr[c] > 0 else zero
                    dr[c] = (g - mean_dy[c]) * k[c] - (xr[c] - mean[c]) * j[c]
            else:
                for c in range(np.uint64(C)):
                    dr[c] = (gr[c] - mean_dy[c]) * k[c] - (xr[c] - mean[c]) * j[c]


# (parallel, serial) variants of each kernel
stats_ncs = _kernel(_stats_ncs)
stats_mc = _kernel(_stats_mc)
elemt_ncs = _kernel(_elemt_ncs)
elemt_mc = _kernel(_elemt_mc)
backward_reduce_ncs = _kernel(_backward_reduce_ncs)
backward_reduce_mc = _kernel(_backward_reduce_mc)
backward_elemt_ncs = _kernel(_backward_elemt_ncs)
backward_elemt_mc = _kernel(_backward_elemt_mc)


# ---------------------------------------------------------------------------------------------
# Fused single-process training step (kernels/cpu.py forward_train / backward_train).
#
# "ncs": one task per channel. The channel's N * S values are read for its statistics and read
# again right away for the elementwise pass, while they are still in cache: forward = read x +
# write y (2 memory passes instead of 3), backward = read dy, x + write dx (3 instead of 5).
# cpu.py takes this path only when a channel's slab fits its cache budget (FUSED_SLAB_BYTES).
# "mc": the whole (M, C) array is the slab: the separate serial kernels, back to back in one
# call (small inputs: one launch instead of two, the second pass from cache).
# Results equal the four separate kernels': the same shifted sums (a float64 total of
# input-precision partials over at most PIECE elements), the same elementwise formulas, and the
# per-channel values read back from the float32 / float64 result arrays before use.
# ---------------------------------------------------------------------------------------------


def _forward_train_ncs(x, weight, bias, residual, has_residual, relu, eps, zero, mean, m2,
                       invstd, out):
    """x (N, C, S); writes mean, m2, invstd = 1 / sqrt(m2 / count + eps) (C,) and out (N, C, S)."""
    N, C, S = x.shape
    count = N * S
    xr = x.reshape(-1)
    yr = out.reshape(-1)
    rr = residual.reshape(-1)
    for c in prange(C):
        shift = xr[c * S]  # x[0, c, 0]
        s1c = 0.0
        s2c = 0.0
        for n in range(N):
            row = n * C + c
            for offset in range(0, S, PIECE):
                start = np.uint64(row * S + offset)
                end = np.uint64(row * S + min(S, offset + PIECE))
                s1 = zero
                s2 = zero
                for i in range(start, end):
                    d = xr[i] - shift
                    s1 += d
                    s2 += d * d
                s1c += s1
                s2c += s2
        d_mean = s1c / count  # mean - K
        mean[c] = shift + d_mean
        m2[c] = max(s2c - s1c * d_mean, 0.0)
        invstd[c] = 1.0 / np.sqrt(m2[c] / count + eps)
        # the elementwise pass over the same channel, from cache
        m = mean[c]
        a = invstd[c] * weight[c]
        b = bias[c]
        for n in range(N):
            start = np.uint64((n * C + c) * S)
            end = start + np.uint64(S)
            if has_residual:
                if relu:
                    for i in range(start, end):
                        y = (xr[i] - m) * a + b + rr[i]
                        yr[i] = zero if y < 0 else y  # NaN passes through, as clamp_min
                else:
                    for i in range(start, end):
                        yr[i] = (xr[i] - m) * a + b + rr[i]
            elif relu:
                for i in range(start, end):
                    y = (xr[i] - m) * a + b
                    yr[i] = zero if y < 0 else y
            else:
                for i in range(start, end):
                    yr[i] = (xr[i] - m) * a + b


def _backward_train_ncs(dy, x, mean, invstd, weight, output, relu, zero, count, grad_input,
                        sum_dy, sum_dy_xhat):
    """Per channel: sum_dy, sum_dy_xhat, then dx with mean_dy = sum_dy / count (count: a scalar
    of the statistics' dtype, so the division rounds as ops.py's tensor division does)."""
    N, C, S = x.shape
    xr = x.reshape(-1)
    gr = dy.reshape(-1)
    dr = grad_input.reshape(-1)
    yr = output.reshape(-1)
    for c in prange(C):
        m = mean[c]
        s1c = 0.0
        s2c = 0.0
        for n in range(N):
            row = n * C + c
            for offset in range(0, S, PIECE):
                start = np.uint64(row * S + offset)
                end = np.uint64(row * S + min(S, offset + PIECE))
                s1 = zero
                s2 = zero
                if relu:
                    for i in range(start, end):
                        g = gr[i] if yr[i] > 0 else zero
                        s1 += g
                        s2 += g * (xr[i] - m)
                else:
                    for i in range(start, end):
                        g = gr[i]
                        s1 += g
                        s2 += g * (xr[i] - m)
                s1c += s1
                s2c += s2
        sum_dy[c] = s1c
        sum_dy_xhat[c] = s2c * invstd[c]
        # the elementwise pass over the same channel, from cache
        mdy = sum_dy[c] / count
        kc = invstd[c] * weight[c]
        jc = invstd[c] * kc * (sum_dy_xhat[c] / count)
        for n in range(N):
            start = np.uint64((n * C + c) * S)
            end = start + np.uint64(S)
            if relu:
                for i in range(start, end):
                    g = gr[i] if yr[i] > 0 else zero
                    dr[i] = (g - mdy) * kc - (xr[i] - m) * jc
            else:
                for i in range(start, end):
                    dr[i] = (gr[i] - mdy) * kc - (xr[i] - m) * jc


def _forward_train_mc(x, weight, bias, residual, has_residual, relu, eps, rows, zero, mean, m2,
                      invstd, out):
    """x (M, C): stats, invstd, elemt in one call (serial; the caller keeps it to small inputs)."""
    M, C = x.shape
    _stats_mc_serial(x, rows, zero, mean, m2)
    for c in range(C):
        invstd[c] = 1.0 / np.sqrt(m2[c] / M + eps)
    _elemt_mc_serial(x, mean, invstd, weight, bias, residual, has_residual, relu, rows, zero, out)


def _backward_train_mc(dy, x, mean, invstd, weight, output, relu, rows, zero, count, grad_input,
                       sum_dy, sum_dy_xhat):
    """x (M, C): backward_reduce then backward_elemt in one call (serial, small inputs)."""
    _backward_reduce_mc_serial(dy, x, mean, invstd, output, relu, rows, zero, sum_dy, sum_dy_xhat)
    mean_dy = sum_dy / count
    mean_dy_xhat = sum_dy_xhat / count
    _backward_elemt_mc_serial(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat, output, relu,
                              rows, zero, grad_input)


forward_train_ncs = _kernel(_forward_train_ncs)
backward_train_ncs = _kernel(_backward_train_ncs)
_stats_mc_serial = stats_mc[1]
_elemt_mc_serial = elemt_mc[1]
_backward_reduce_mc_serial = backward_reduce_mc[1]
_backward_elemt_mc_serial = backward_elemt_mc[1]
forward_train_mc = _compile(_forward_train_mc, parallel=False)
backward_train_mc = _compile(_backward_train_mc, parallel=False)
