"""Batch renormalization (Ioffe 2017): batch statistics corrected towards the running ones by
r and d, clipped, with no gradient through them.
"""


import torch
from torch import Tensor

from batchnorm import functional, nn, ops
from batchnorm.layout import memory_format, values_per_channel


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
        count = values_per_channel(input)
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
        grad_out = grad_out.contiguous(memory_format=memory_format(input))
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
        return functional.batch_norm_step(input, running_mean, running_var, weight, bias,
                                          training, momentum, eps,
                                          num_batches_tracked=num_batches_tracked)[0]
    functional.check_arguments(input, running_mean, running_var, weight, bias, None, True, eps)
    bad_r = not isinstance(r_max, Tensor) and r_max < 1  # tensors: no host sync to check
    bad_d = not isinstance(d_max, Tensor) and d_max < 0
    if bad_r or bad_d:
        raise ValueError(f"batch_renorm expects r_max >= 1 and d_max >= 0, got r_max={r_max} "
                         f"and d_max={d_max}")
    r_max, d_max = torch.as_tensor(r_max), torch.as_tensor(d_max)
    layout = memory_format(input)
    input = input.contiguous(memory_format=layout)
    output, mean, m2 = _BatchRenormTrain.apply(input, weight, bias, running_mean, running_var,
                                               eps, r_max.to(input.device), d_max.to(input.device))
    count = torch.as_tensor(values_per_channel(input), dtype=m2.dtype, device=m2.device)
    finite = functional.update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                             m2, count, momentum)
    if functional.is_skipped(finite):
        functional.warn_skipped("batch_renorm")
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
        assert self.num_batches_tracked is not None, "track_running_stats=True registers it"
        return renorm_limits(self.num_batches_tracked, self.r_max, self.d_max,
                             self.warmup_steps, self.r_max_steps, self.d_max_steps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return functional.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                         self.bias, False, 0.0, self.eps)
        r_max, d_max = self.current_limits()
        # track_running_stats turned off after construction freezes the buffers (as in torch):
        # r and d still compare with them, but they are not updated (factor 0, no step counted)
        tracking = self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        assert running_mean is not None and running_var is not None, "the constructor needs them"
        return batch_renorm(input, running_mean, running_var, self.weight, self.bias,
                            True, self.momentum if tracking else 0.0, self.eps, r_max, d_max,
                            num_batches_tracked=self.num_batches_tracked if tracking else None)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L) input."""


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch renormalization over (N, C, H, W) input."""


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch renormalization over (N, C, D, H, W) input."""
