"""The batch-norm family: ghost batch norm, batch renormalization, frozen batch norm.

    ghost_batch_norm / GhostBatchNorm1d/2d/3d   statistics over virtual batches of a fixed size
                                                 (Hoffer et al. 2017): one reshape, no loop
    batch_renorm / BatchRenorm1d/2d/3d          Ioffe 2017: batch statistics corrected towards
                                                 the running ones by r and d (no gradient)
    FrozenBatchNorm1d/2d/3d, freeze_batchnorm   eval-mode batch norm with buffers only, as
                                                 torchvision.ops.FrozenBatchNorm2d

Each is built on the same ops as plain batch norm (ops.py); in evaluation mode all of them are
plain batch norm with running statistics, so the model tools (folding, ...) treat them alike.
"""

import warnings

import torch
from torch import Tensor
from torch.nn.modules import batchnorm as torch_bn

from batchnorm import functional as F
from batchnorm import nn, ops

__all__ = [
    "ghost_batch_norm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "batch_renorm", "renorm_limits", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "freeze_batchnorm",
]


# ---------------------------------------------------------------------------------------------
# Ghost batch norm
# ---------------------------------------------------------------------------------------------


def ghost_chunk_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the virtual batches a batch of `batch` samples is split into, in order.

    max(1, batch // virtual_batch_size) chunks of virtual_batch_size samples; the remainder
    joins the LAST chunk instead of forming a small one of its own, so a virtual batch is never
    smaller than virtual_batch_size unless the whole batch is (a trailing chunk of one sample has
    no variance: keras#15790, tabnet#243). 10 by 4 -> [4, 6];  3 by 4 -> [3].
    """
    chunks = max(1, batch // virtual_batch_size)
    return [virtual_batch_size] * (chunks - 1) + [batch - virtual_batch_size * (chunks - 1)]


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    virtual_batch_size: int,
    *,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch norm whose training statistics are those of virtual batches (ghost_chunk_sizes).

    Equal to normalizing each chunk with batch norm in turn, running statistics included: they
    are updated once per chunk, in order (a closed form of the repeated update, no loop).
    training=False normalizes with running_mean / running_var, as plain batch norm.
    """
    if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    if not training or input.numel() == 0:
        return F._batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                             eps, num_batches_tracked=num_batches_tracked)
    F._check(input, running_mean, running_var, weight, bias, None, False, momentum, eps)
    sizes = ghost_chunk_sizes(input.shape[0], virtual_batch_size)
    per_sample = input.numel() // (input.shape[0] * input.shape[1])
    if min(sizes) * per_sample <= 1:
        raise ValueError(
            f"ghost batch norm expects more than 1 value per channel in every virtual batch when "
            f"training, got virtual batches of {sizes} samples of input size {tuple(input.size())}"
        )
    layout = ops.memory_format(input)
    C, spatial, v = input.shape[1], input.shape[2:], virtual_batch_size
    full = len(sizes) if sizes[-1] == v else len(sizes) - 1  # chunks of exactly v samples

    outputs, means, m2s, counts = [], [], [], []
    if full:
        # (full v, C, *) -> (full, v, C, *) -> (v, full, C, *) -> (v, full C, *): each chunk's
        # channels become channels of one batch norm over v samples (one copy, no loop)
        head = input[:full * v].contiguous().view(full, v, C, *spatial).transpose(0, 1)
        head = head.reshape(v, full * C, *spatial)
        w = None if weight is None else weight.repeat(full)  # grads sum back over the chunks
        b = None if bias is None else bias.repeat(full)
        out, mean, m2, count = ops.batch_norm_train(head, w, b, eps)
        outputs.append(out.view(v, full, C, *spatial).transpose(0, 1).reshape(full * v, C,
                                                                            *spatial))
        means.append(mean.view(full, C))
        m2s.append(m2.view(full, C))
        counts.append(count.expand(full))
    if full < len(sizes):  # the last chunk, v + remainder samples (or the whole, smaller batch)
        tail = input[full * v:].contiguous(memory_format=layout)
        out, mean, m2, count = ops.batch_norm_train(tail, weight, bias, eps)
        outputs.append(out)
        means.append(mean.view(1, C))
        m2s.append(m2.view(1, C))
        counts.append(count.view(1))
    output = torch.cat(outputs).contiguous(memory_format=layout)

    if running_mean is not None and running_var is not None:
        count = torch.cat(counts).view(-1, 1)
        _update_running_stats_chunks(running_mean, running_var, torch.cat(means),
                                     torch.cat(m2s) / (count - 1), momentum, num_batches_tracked)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    return output


@torch.no_grad()
def _update_running_stats_chunks(running_mean: Tensor, running_var: Tensor, means: Tensor,
                                 unbiased_vars: Tensor, momentum: float | None,
                                 num_batches_tracked: Tensor | None) -> None:
    """Apply the running-statistics update once per chunk (rows of means), in order, in closed form.

    momentum m, K chunks: running_K = (1 - m)^K running_0 + sum_i m (1 - m)^(K-1-i) batch_i.
    momentum None (cumulative average over n0 batches so far): (n0 running_0 + sum_i batch_i) /
    (n0 + K). As functional._update_running_stats, unbiased variances go into running_var, and a
    batch with non-finite statistics leaves the buffers (and num_batches_tracked) unchanged.
    """
    K, acc = means.shape[0], means.dtype
    finite = torch.isfinite(means).all() & torch.isfinite(unbiased_vars).all()
    old_mean, old_var = running_mean.to(acc), running_var.to(acc)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        seen = num_batches_tracked.to(acc)
        new_mean = (seen * old_mean + means.sum(0)) / (seen + K)
        new_var = (seen * old_var + unbiased_vars.sum(0)) / (seen + K)
    else:
        powers = torch.arange(K - 1, -1, -1, dtype=acc, device=means.device)  # K-1 ... 0
        weights = (momentum * (1 - momentum) ** powers).view(K, 1)
        keep = (1 - momentum) ** K
        new_mean = keep * old_mean + (weights * means).sum(0)
        new_var = keep * old_var + (weights * unbiased_vars).sum(0)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype) * K)
    running_mean.copy_(torch.where(finite, new_mean, old_mean))
    running_var.copy_(torch.where(finite, new_var, old_var))
    if means.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(finite):
        warnings.warn("ghost batch norm: this training batch has non-finite statistics; "
                      "running_mean and running_var were left unchanged", RuntimeWarning,
                      stacklevel=4)


class _GhostBatchNorm(nn._BatchNorm):
    """Ghost batch norm: training statistics over virtual batches of virtual_batch_size samples."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, virtual_batch_size: int) -> None:
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got "
                             f"{virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, num_batches_tracked = self._buffers_to_update()
        return ghost_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                self._use_batch_stats(), self.momentum, self.eps,
                                self.virtual_batch_size, num_batches_tracked=num_batches_tracked)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input (TabNet's GBN)."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input."""


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input."""


# ---------------------------------------------------------------------------------------------
# Batch renormalization
# ---------------------------------------------------------------------------------------------


def renorm_limits(step: Tensor | int, r_max: float, d_max: float, warmup_steps: int,
                  r_max_steps: int, d_max_steps: int) -> tuple[Tensor, Tensor]:
    """The clipping limits (r_max_t, d_max_t) after `step` training batches (Ioffe 2017, sec. 4).

    Plain batch norm (1, 0) for the first warmup_steps, then a linear ramp reaching r_max at
    step r_max_steps and d_max at d_max_steps (the paper: 5k warm-up, r_max = 3 at 40k, d_max = 5
    at 25k). Computed with tensor operations, so a device-side step costs no host sync.
    """
    step = torch.as_tensor(step, dtype=torch.float64)

    def ramp(start: float, final: float, end_step: int) -> Tensor:
        if end_step <= warmup_steps:
            progress = (step >= warmup_steps).to(torch.float64)
        else:
            progress = ((step - warmup_steps) / (end_step - warmup_steps)).clamp(0, 1)
        return start + (final - start) * progress

    return ramp(1.0, r_max, r_max_steps), ramp(0.0, d_max, d_max_steps)


class _BatchRenormTrain(torch.autograd.Function):
    """Forward: stats -> r, d (constants) -> elemt with weight gamma r and bias gamma d + beta.

    y = gamma (x_hat r + d) + beta. With r and d held constant (the paper's stop_gradient) the
    input gradient is plain batch norm's with weight gamma r; d gamma = r sum(dy x_hat) + d sum(dy).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, r_max, d_max):
        mean, m2 = ops.stats(input)
        count = input.numel() // input.shape[1]
        acc = mean.dtype
        var = m2 / count  # biased: the batch's own variance
        invstd = torch.rsqrt(var + eps)
        sigma_running = torch.sqrt(running_var.to(acc) + eps)
        r_max, d_max = r_max.to(acc), d_max.to(acc)
        r = torch.minimum(torch.maximum(torch.sqrt(var + eps) / sigma_running, 1 / r_max), r_max)
        d = torch.minimum(torch.maximum((mean - running_mean.to(acc)) / sigma_running, -d_max),
                          d_max)
        gamma = torch.ones_like(mean) if weight is None else weight.to(acc)
        beta = torch.zeros_like(mean) if bias is None else bias.to(acc)
        scale, shift = gamma * r, gamma * d + beta
        output = ops.elemt(input, mean, invstd, scale, shift, None, False)
        ctx.count = count
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, mean, invstd, scale, r, d)
        ctx.mark_non_differentiable(mean, m2)
        return output, mean, m2

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_m2):
        if torch.is_grad_enabled():
            raise NotImplementedError("double backward through batch_renorm is not supported")
        input, mean, invstd, scale, r, d = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=ops.memory_format(input))
        sum_dy, sum_dy_xhat = ops.backward_reduce(grad_out, input, mean, invstd, None)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.backward_elemt(grad_out, input, mean, invstd, scale,
                                            sum_dy / ctx.count, sum_dy_xhat / ctx.count, None)
        if ctx.needs_input_grad[1]:
            grad_weight = (r * sum_dy_xhat + d * sum_dy).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    *,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch renormalization (Ioffe 2017, Algorithm 1), training; plain eval otherwise.

        sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mu_B - running_mean) / sigma, +-d_max)
        y = gamma ((x - mu_B) / sigma_B * r + d) + beta,    r and d without gradient

    Departure from the paper: the running statistics are batch norm's (running_var, updated with
    the unbiased batch variance, as functional.batch_norm), not a running sigma; sigma is derived
    from running_var, so state_dicts match BatchNorm's. r_max = 1, d_max = 0 is plain batch norm.
    """
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var: r and d compare the "
                         "batch's statistics with them (track_running_stats=True)")
    if not training or input.numel() == 0:
        return F._batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                             eps, num_batches_tracked=num_batches_tracked)
    F._check(input, running_mean, running_var, weight, bias, None, True, momentum, eps)
    bad_r = not isinstance(r_max, Tensor) and r_max < 1  # tensors: no host sync to check
    bad_d = not isinstance(d_max, Tensor) and d_max < 0
    if bad_r or bad_d:
        raise ValueError(f"batch_renorm expects r_max >= 1 and d_max >= 0, got r_max={r_max} "
                         f"and d_max={d_max}")
    r_max, d_max = torch.as_tensor(r_max), torch.as_tensor(d_max)
    layout = ops.memory_format(input)
    input = input.contiguous(memory_format=layout)
    output, mean, m2 = _BatchRenormTrain.apply(input, weight, bias, running_mean, running_var,
                                               eps, r_max.to(input.device), d_max.to(input.device))
    count = torch.as_tensor(input.numel() // input.shape[1], dtype=m2.dtype, device=m2.device)
    F._update_running_stats(running_mean, running_var, mean, m2, count, momentum,
                            num_batches_tracked)
    return output


class _BatchRenorm(nn._BatchNorm):
    """Batch renormalization with the paper's warm-up: plain batch norm, then r_max / d_max grow.

    The schedule runs on num_batches_tracked (renorm_limits): r_max and d_max are the final
    limits, reached at steps r_max_steps and d_max_steps after warmup_steps of plain batch norm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
                 r_max_steps: int = 40000, d_max_steps: int = 25000) -> None:
        if not track_running_stats:
            raise ValueError("batch renormalization needs running statistics (r and d compare "
                             "the batch's with them): track_running_stats must be True")
        if r_max < 1 or d_max < 0:
            raise ValueError(f"expected r_max >= 1 and d_max >= 0, got r_max={r_max}, "
                             f"d_max={d_max}")
        if min(warmup_steps, r_max_steps, d_max_steps) < 0:
            raise ValueError("warmup_steps, r_max_steps and d_max_steps must be >= 0")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = (warmup_steps, r_max_steps,
                                                                 d_max_steps)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
                f"d_max_steps={self.d_max_steps}")

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) in force for the next training batch."""
        return renorm_limits(self.num_batches_tracked, self.r_max, self.d_max,
                             self.warmup_steps, self.r_max_steps, self.d_max_steps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F._batch_norm(input, self.running_mean, self.running_var, self.weight,
                                 self.bias, False, self.momentum, self.eps)
        r_max, d_max = self.current_limits()
        # track_running_stats turned off after construction freezes the buffers (as in torch):
        # r and d still compare with them, but they are not updated (factor 0, no step counted)
        tracking = self.track_running_stats
        return batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            True, self.momentum if tracking else 0.0, self.eps, r_max, d_max,
                            num_batches_tracked=self.num_batches_tracked if tracking else None)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L) input."""


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch renormalization over (N, C, H, W) input."""


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch renormalization over (N, C, D, H, W) input."""


# ---------------------------------------------------------------------------------------------
# Frozen batch norm
# ---------------------------------------------------------------------------------------------


class FrozenBatchNorm(torch.nn.Module):
    """Batch norm with fixed statistics and affine parameters: buffers only, nothing to train.

    The state_dict is torchvision.ops.FrozenBatchNorm2d's (weight, bias, running_mean,
    running_var, all buffers); a BatchNorm's state_dict loads too (num_batches_tracked is
    dropped). The output is eval-mode batch norm's. Any input rank >= 2; relu=True (keyword)
    fuses a ReLU, and forward(x, residual) adds a residual first, as BatchNormAddReLU2d.
    """

    _ranks: tuple[int, ...] | None = None  # None: any rank >= 2

    def __init__(self, num_features: int, eps: float = 1e-5, *, relu: bool = False, device=None,
                 dtype=None) -> None:
        nn.check_constructor_args(num_features, eps, 0.0)
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
        return F._batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps, residual=residual, relu=self.relu)

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
                                   relu=getattr(module, "_relu", False), device=stats.device,
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
    if isinstance(model, torch_bn._BatchNorm):
        return frozen_from(model)
    for name, child in model.named_children():
        frozen = freeze_batchnorm(child)
        if frozen is not child:
            setattr(model, name, frozen)
    return model


FAMILY = (_GhostBatchNorm, _BatchRenorm)  # batch norms with statistics of their own
