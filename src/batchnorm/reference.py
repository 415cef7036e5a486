"""The specification: Batch Normalization (Ioffe & Szegedy, 2015) in NumPy, float64, no framework.

Everything else in this package (ops, kernels, modules) is tested against these functions; they
are written for reading, one stage of the computation graph per line, not for speed.

Map from the paper to this file:

    Algorithm 1 (training: normalize with the mini-batch's statistics)
        mu_B      = 1/m sum x_i                 train_forward, stage 1
        sigma2_B  = 1/m sum (x_i - mu_B)^2      stages 2-4 (the biased variance: divide by m)
        x_hat_i   = (x_i - mu_B) / sqrt(sigma2_B + eps)     stages 5-8
        y_i       = gamma x_hat_i + beta        stages 9-10
      its gradients (the paper's section 3, the chain rule through the graph)
                                                backward_stages (stage by stage, mirrored order)
                                                backward_closed_form (the compact formula)

    Algorithm 2 (inference: normalize with population statistics)
        E[x]   <- average of mu_B over batches     update_running_stats: an exponential moving
        Var[x] <- m/(m-1) * average of sigma2_B       average (PyTorch's momentum), or the exact
                                                      cumulative average when momentum is None
        y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma E[x] / sqrt(Var[x] + eps))
                                                eval_forward

"m" is the number of values each channel's statistics are taken over: N for (N, C) input,
N * L for (N, C, L), N * H * W for (N, C, H, W) and so on. The channel axis is `axis` (1 for
PyTorch's layouts, -1 for channels-last (N, H, W, C)); the statistics reduce over every other axis.

Where the code departs from the bare formula it says so: running_var stores the unbiased
variance m/(m-1) * sigma2_B although the normalization uses the biased sigma2_B (as the paper's
Algorithm 2 and PyTorch do).
"""

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Cache",
    "train_forward",
    "backward_stages",
    "backward_closed_form",
    "eval_forward",
    "update_running_stats",
    "numerical_gradient",
]


# ----------------------------------------------------------------------------------------------
# Shapes: which axis holds the channels, which axes the statistics reduce over


def _channel_axis(x: np.ndarray, axis: int) -> int:
    """The channel axis as a non-negative index, or a ValueError naming the layouts accepted."""
    if x.ndim < 2:
        raise ValueError(
            f"batch norm expects an input of at least 2 dimensions, (N, C) or (N, C, *) or "
            f"channels-last (N, *, C), got {x.ndim}D input of shape {x.shape}"
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"channel axis {axis} is out of range for {x.ndim}D input of shape {x.shape}; "
            f"expected an axis in [{-x.ndim}, {x.ndim - 1}]"
        )
    axis = axis % x.ndim
    if axis == 0:
        raise ValueError(
            f"channel axis 0 is the batch axis of input of shape {x.shape}; expected the channel "
            f"axis to be 1 (N, C, *) or -1 (channels-last)"
        )
    return axis


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis but the channel axis: the statistics are per channel."""
    return tuple(a for a in range(ndim) if a != axis)


def _per_channel(values, name: str, x: np.ndarray, axis: int, default: float) -> np.ndarray:
    """A (C,) vector in x's dtype, shaped to broadcast against x: (1, C, 1, 1) for axis=1 of 4D.

    None stands for the default (gamma = 1, beta = 0: no affine).
    """
    channels = x.shape[axis]
    if values is None:
        values = np.full(channels, default)
    values = np.asarray(values, dtype=x.dtype)
    if values.shape != (channels,):
        raise ValueError(
            f"{name} should have one value per channel, shape ({channels},), got shape "
            f"{values.shape}"
        )
    shape = [1] * x.ndim
    shape[axis] = channels
    return values.reshape(shape)


def _as_float(x, dtype) -> np.ndarray:
    """x as an array of the floating dtype the computation runs in."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating-point type (float64, float32, ...), "
                         f"got {dtype}")
    return np.asarray(x, dtype=dtype)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive (it keeps sqrt(var + eps) away from 0), got {eps}")


# ----------------------------------------------------------------------------------------------
# Algorithm 1: training forward


@dataclass(frozen=True)
class Cache:
    """What the backward pass needs from the forward pass (arrays keep the input's rank)."""

    xmu: np.ndarray      # x - mu                          (input's shape)
    std: np.ndarray      # sqrt(var + eps)                 (1, C, 1, ...) broadcast shape
    invstd: np.ndarray   # 1 / sqrt(var + eps)             (1, C, 1, ...)
    x_hat: np.ndarray    # (x - mu) * invstd               (input's shape)
    gamma: np.ndarray    # scale                           (1, C, 1, ...)
    mean: np.ndarray     # mu_B, the batch mean            (C,)
    var: np.ndarray      # sigma2_B, the biased variance   (C,)
    m: int               # values per channel
    axis: int            # the channel axis (non-negative)


def train_forward(x, gamma=None, beta=None, eps: float = 1e-5, axis: int = 1, *,
                  dtype=np.float64):
    """Algorithm 1: normalize with the batch's own statistics, then scale and shift.

    x: (N, C, *) with axis=1, or channels-last (N, *, C) with axis=-1; gamma, beta: (C,) or None.
    Returns (y, cache): y has x's shape; cache holds what backward needs and the batch's mean and
    biased variance (cache.mean, cache.var) for update_running_stats. Every stage runs in `dtype`
    (float64 by default: the specification; float32 models a float32 computation).
    """
    x = _as_float(x, dtype)
    axis = _channel_axis(x, axis)
    channels = x.shape[axis]
    dims = _reduce_axes(x.ndim, axis)
    m = x.size // channels if channels else 0
    if m < 2:
        raise ValueError(
            f"batch norm in training needs more than 1 value per channel to estimate a variance, "
            f"got {m} for input of shape {x.shape} (channel axis {axis})"
        )
    _check_eps(eps)
    gamma = _per_channel(gamma, "gamma", x, axis, default=1.0)
    beta = _per_channel(beta, "beta", x, axis, default=0.0)

    mu = x.mean(axis=dims, keepdims=True)        # stage 1   mean over the batch    (1, C, 1..)
    xmu = x - mu                                 # stage 2   centre
    sq = xmu**2                                  # stage 3   square
    var = sq.mean(axis=dims, keepdims=True)      # stage 4   biased variance: / m   (1, C, 1..)
    var_eps = var + eps                          # stage 5   + eps
    std = np.sqrt(var_eps)                       # stage 6   sqrt
    invstd = 1.0 / std                           # stage 7   inverse
    x_hat = xmu * invstd                         # stage 8   normalized
    scaled = gamma * x_hat                       # stage 9   scale
    y = scaled + beta                            # stage 10  shift

    cache = Cache(xmu=xmu, std=std, invstd=invstd, x_hat=x_hat, gamma=gamma,
                  mean=mu.reshape(channels), var=var.reshape(channels), m=m, axis=axis)
    return y, cache


# ----------------------------------------------------------------------------------------------
# The backward pass, twice


def backward_stages(dy, cache: Cache):
    """dL/dx, dL/dgamma, dL/dbeta from dL/dy, back through train_forward's stages 10 .. 1.

    Each line is one stage's local derivative times the gradient flowing in; where a stage's
    output was a per-channel statistic (broadcast over the batch) its gradient is a sum, and
    where the stage was a mean its backward spreads the gradient out divided by m.
    """
    dy = np.asarray(dy, dtype=cache.x_hat.dtype)
    if dy.shape != cache.x_hat.shape:
        raise ValueError(f"dy must have the forward input's shape {cache.x_hat.shape}, "
                         f"got {dy.shape}")
    dims = _reduce_axes(dy.ndim, cache.axis)
    m, xmu, std, invstd, x_hat, gamma = (cache.m, cache.xmu, cache.std, cache.invstd,
                                         cache.x_hat, cache.gamma)

    # stage 10  y = scaled + beta        d/dscaled = 1; beta is broadcast, so its gradient sums
    dscaled = dy
    dbeta = dy.sum(axis=dims, keepdims=True)
    # stage 9   scaled = gamma * x_hat   d/dx_hat = gamma; d/dgamma = x_hat, summed
    dx_hat = dscaled * gamma
    dgamma = (dscaled * x_hat).sum(axis=dims, keepdims=True)
    # stage 8   x_hat = xmu * invstd     d/dxmu = invstd; d/dinvstd = xmu, summed
    dxmu = dx_hat * invstd                            # xmu's first path (of two)
    dinvstd = (dx_hat * xmu).sum(axis=dims, keepdims=True)
    # stage 7   invstd = 1 / std         d/dstd = -1 / std^2
    dstd = dinvstd * (-1.0 / std**2)
    # stage 6   std = sqrt(var_eps)      d/dvar_eps = 1 / (2 sqrt(var_eps)) = 0.5 / std
    dvar_eps = dstd * (0.5 / std)
    # stage 5   var_eps = var + eps      d/dvar = 1
    dvar = dvar_eps
    # stage 4   var = mean(sq)           d/dsq = 1/m for every element
    dsq = np.broadcast_to(dvar / m, xmu.shape)
    # stage 3   sq = xmu^2               d/dxmu = 2 xmu
    dxmu = dxmu + dsq * 2.0 * xmu                     # xmu's second path adds to the first
    # stage 2   xmu = x - mu             d/dx = 1; d/dmu = -1, summed (mu is broadcast)
    dx = dxmu.copy()                                  # x's first path (of two)
    dmu = -dxmu.sum(axis=dims, keepdims=True)
    # stage 1   mu = mean(x)             d/dx = 1/m for every element
    dx += np.broadcast_to(dmu / m, dx.shape)          # x's second path adds to the first

    channels = dy.shape[cache.axis]
    return dx, dgamma.reshape(channels), dbeta.reshape(channels)


def backward_closed_form(dy, cache: Cache):
    """The same gradients in closed form (stages 1-8 collapsed):

        dx     = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))
        dgamma = sum(dy * x_hat)
        dbeta  = sum(dy)

    with the sums per channel. This is what the kernels' backward_reduce (the two sums) and
    backward_elemt (the dx line) compute.
    """
    dy = np.asarray(dy, dtype=cache.x_hat.dtype)
    if dy.shape != cache.x_hat.shape:
        raise ValueError(f"dy must have the forward input's shape {cache.x_hat.shape}, "
                         f"got {dy.shape}")
    dims = _reduce_axes(dy.ndim, cache.axis)
    m, x_hat = cache.m, cache.x_hat
    sum_dy = dy.sum(axis=dims, keepdims=True)                    # (1, C, 1..)
    sum_dy_xhat = (dy * x_hat).sum(axis=dims, keepdims=True)     # (1, C, 1..)
    dx = cache.gamma * cache.invstd / m * (m * dy - sum_dy - x_hat * sum_dy_xhat)
    channels = dy.shape[cache.axis]
    return dx, sum_dy_xhat.reshape(channels), sum_dy.reshape(channels)


# ----------------------------------------------------------------------------------------------
# Algorithm 2: inference with population statistics, and how they are estimated


def eval_forward(x, running_mean, running_var, gamma=None, beta=None, eps: float = 1e-5,
                 axis: int = 1, *, dtype=np.float64):
    """Algorithm 2, step 11: y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma E[x] / sqrt(..)).

    A fixed per-channel affine map of x (which is why eval-mode BN folds into a neighbouring
    conv or linear layer). running_mean, running_var: (C,), the population estimates E[x], Var[x].
    Computed in `dtype` (float64 by default).
    """
    x = _as_float(x, dtype)
    axis = _channel_axis(x, axis)
    _check_eps(eps)
    mean = _per_channel(running_mean, "running_mean", x, axis, default=0.0)
    var = _per_channel(running_var, "running_var", x, axis, default=1.0)
    gamma = _per_channel(gamma, "gamma", x, axis, default=1.0)
    beta = _per_channel(beta, "beta", x, axis, default=0.0)

    scale = gamma / np.sqrt(var + eps)     # gamma / sqrt(Var[x] + eps)       (1, C, 1..)
    shift = beta - scale * mean            # beta - gamma E[x] / sqrt(..)     (1, C, 1..)
    return scale * x + shift


def update_running_stats(running_mean, running_var, batch_mean, batch_var_biased, m: int,
                         momentum: float | None = 0.1, num_batches_tracked: int = 0):
    """One step of the population-statistics estimate, PyTorch's convention. Pure: returns
    (new_running_mean, new_running_var, new_num_batches_tracked).

        running = (1 - factor) * running + factor * batch_statistic

    factor = momentum; or, when momentum is None, 1 / (batches seen including this one), which
    makes running_mean exactly the average of the batch means so far (the paper's E_B[mu_B]).
    num_batches_tracked is the count before this batch.

    Departure from the normalization: the variance stored is the unbiased m/(m-1) * sigma2_B
    (Bessel's correction, the paper's Var[x] = m/(m-1) E_B[sigma2_B]), while training normalizes
    with the biased sigma2_B. Note: PyTorch's momentum is 1 - the usual "decay" of an exponential
    moving average; momentum=0.1 keeps 90% of the old value.
    """
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1] (or be None for a cumulative average), "
                         f"got {momentum}")
    if m < 2:
        raise ValueError(f"the unbiased variance m/(m-1) * var needs m >= 2 values per channel, "
                         f"got m={m}")
    if num_batches_tracked < 0:
        raise ValueError(f"num_batches_tracked counts batches, expected >= 0, "
                         f"got {num_batches_tracked}")
    arrays = [np.asarray(a, dtype=np.float64)
              for a in (running_mean, running_var, batch_mean, batch_var_biased)]
    running_mean, running_var, batch_mean, batch_var_biased = arrays
    if len({a.shape for a in arrays}) != 1 or running_mean.ndim != 1:
        raise ValueError(
            f"running_mean, running_var, batch_mean, batch_var_biased must all be (C,) vectors "
            f"of one length, got shapes {[a.shape for a in arrays]}"
        )

    num_batches_tracked = num_batches_tracked + 1
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    batch_var_unbiased = batch_var_biased * m / (m - 1)      # Bessel's correction
    new_mean = (1.0 - factor) * running_mean + factor * batch_mean
    new_var = (1.0 - factor) * running_var + factor * batch_var_unbiased
    return new_mean, new_var, num_batches_tracked


# ----------------------------------------------------------------------------------------------
# Checking gradients


def numerical_gradient(f, x, h: float = 1e-6):
    """d f / d x by central differences, (f(x + h e_i) - f(x - h e_i)) / 2h for every element.

    f maps an array shaped like x to a scalar. Error O(h^2) plus rounding O(eps_64 / h): with
    float64 and h = 1e-6 about 1e-9 relative for well-scaled f. Cost: 2 * x.size calls of f.
    """
    x = np.array(x, dtype=np.float64)  # a copy: perturbed in place below
    grad = np.empty_like(x)
    flat_x, flat_grad = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + h
        f_plus = float(f(x))
        flat_x[i] = saved - h
        f_minus = float(f(x))
        flat_x[i] = saved
        flat_grad[i] = (f_plus - f_minus) / (2.0 * h)
    return grad


# ----------------------------------------------------------------------------------------------
# Batch Renormalization (Ioffe, 2017): the batch statistics corrected towards the running ones
#
#     sigma_B = sqrt(sigma2_B + eps),  sigma = sqrt(running_var + eps)
#     r = clip(sigma_B / sigma, 1/r_max, r_max)             stop_gradient: a constant in backward
#     d = clip((mu_B - running_mean) / sigma, -d_max, d_max)   stop_gradient
#     x_hat = (x - mu_B) / sigma_B * r + d,   y = gamma x_hat + beta
#
# r = 1, d = 0 (r_max = 1, d_max = 0) is Algorithm 1; unclipped, x_hat = (x - running_mean) /
# sigma: the training forward uses the running statistics, as inference does, while the gradient
# still flows through mu_B and sigma_B. Departure from the paper: the running statistics are
# Algorithm 2's (update_running_stats: running_var with the unbiased variance), not a running
# sigma; sigma is derived from running_var, so the state is batch norm's.

__all__ += ["RenormCache", "renorm_train_forward", "renorm_backward"]


@dataclass(frozen=True)
class RenormCache:
    """What renorm_backward needs: Algorithm 1's cache (gamma = the affine scale) and r, d."""

    bn: Cache            # train_forward's cache of the normalization by the batch statistics
    r: np.ndarray        # (1, C, 1, ...) the variance correction, a constant for backward
    d: np.ndarray        # (1, C, 1, ...) the mean correction, a constant for backward
    x_renorm: np.ndarray  # x_hat * r + d   (input's shape)


def renorm_train_forward(x, running_mean, running_var, gamma=None, beta=None, r_max: float = 3.0,
                         d_max: float = 5.0, eps: float = 1e-5, axis: int = 1, *,
                         dtype=np.float64):
    """Batch renormalization, training (Ioffe 2017, Algorithm 1). Returns (y, cache).

    cache.bn.mean and cache.bn.var are the batch's mean and biased variance, for
    update_running_stats; cache.r and cache.d the corrections applied.
    """
    if r_max < 1 or d_max < 0:
        raise ValueError(f"batch renormalization expects r_max >= 1 and d_max >= 0, got "
                         f"r_max={r_max}, d_max={d_max}")
    _, bn = train_forward(x, None, None, eps, axis, dtype=dtype)   # x_hat with the batch's stats
    x = _as_float(x, dtype)
    gamma = _per_channel(gamma, "gamma", x, bn.axis, default=1.0)
    beta = _per_channel(beta, "beta", x, bn.axis, default=0.0)
    mean = _per_channel(running_mean, "running_mean", x, bn.axis, default=0.0)
    sigma = np.sqrt(_per_channel(running_var, "running_var", x, bn.axis, default=1.0) + eps)
    mu_b = bn.mean.reshape(sigma.shape)

    r = np.clip(bn.std / sigma, 1.0 / r_max, r_max)              # sigma_B / sigma, clipped
    d = np.clip((mu_b - mean) / sigma, -d_max, d_max)            # (mu_B - mu) / sigma, clipped
    x_renorm = bn.x_hat * r + d                                  # corrected normalization
    y = gamma * x_renorm + beta
    bn = Cache(xmu=bn.xmu, std=bn.std, invstd=bn.invstd, x_hat=bn.x_hat, gamma=gamma,
               mean=bn.mean, var=bn.var, m=bn.m, axis=bn.axis)
    return y, RenormCache(bn=bn, r=r, d=d, x_renorm=x_renorm)


def renorm_backward(dy, cache: RenormCache):
    """dL/dx, dL/dgamma, dL/dbeta of batch renormalization, r and d held constant (the paper's
    backward, stage by stage):

        dx_renorm = dy gamma
        dsigma_B  = sum(dx_renorm (x - mu_B) (-r / sigma_B^2))
        dmu_B     = sum(dx_renorm (-r / sigma_B))
        dx        = dx_renorm r / sigma_B + dsigma_B (x - mu_B) / (m sigma_B) + dmu_B / m
        dgamma    = sum(dy x_renorm),   dbeta = sum(dy)
    """
    bn = cache.bn
    dy = np.asarray(dy, dtype=bn.x_hat.dtype)
    if dy.shape != bn.x_hat.shape:
        raise ValueError(f"dy must have the forward input's shape {bn.x_hat.shape}, "
                         f"got {dy.shape}")
    dims = _reduce_axes(dy.ndim, bn.axis)
    r, sigma_b, xmu, m = cache.r, bn.std, bn.xmu, bn.m
    dx_renorm = dy * bn.gamma
    dsigma_b = (dx_renorm * xmu * (-r / sigma_b**2)).sum(axis=dims, keepdims=True)
    dmu_b = (dx_renorm * (-r / sigma_b)).sum(axis=dims, keepdims=True)
    dx = dx_renorm * r / sigma_b + dsigma_b * xmu / (m * sigma_b) + dmu_b / m
    channels = dy.shape[bn.axis]
    dgamma = (dy * cache.x_renorm).sum(axis=dims).reshape(channels)
    dbeta = dy.sum(axis=dims).reshape(channels)
    return dx, dgamma, dbeta
