"""Pure tensor functions behind the model tools: BN as a per-channel affine map, folded in weights.

In eval mode with running statistics, batch norm is the per-channel affine map

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta = scale * x + shift

so it can be folded into a neighbouring linear layer. Everything here is computed in float64
and cast back to the weight's dtype at the end: folding is one multiply per weight, and doing it
in float64 keeps the folded layer within one rounding of the exact product.

Weight layouts (what "output channel" means for each layer):

    Conv{1,2,3}d, Linear      (C_out, C_in / groups, *kernel)   output channel on dim 0
    ConvTranspose{1,2,3}d     (C_in, C_out / groups, *kernel)   output channel o = g * C_out/G + j
                                                                 lives on dim 1 of group g's rows
"""

import torch
from torch import Tensor

__all__ = ["bn_scale_shift", "fold_bn_weights", "fold_bn_into_next_weights", "absorb_bias"]


def bn_scale_shift(mean: Tensor, var: Tensor, eps: float, gamma: Tensor | None,
                   beta: Tensor | None) -> tuple[Tensor, Tensor]:
    """(scale, shift), float64, with batch_norm_eval(x) = scale * x + shift per channel."""
    mean, var = mean.detach().double(), var.detach().double()
    scale = torch.rsqrt(var + eps)  # eval normalizes with running_var itself (unbiased estimate)
    if gamma is not None:
        scale = scale * gamma.detach().double()
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.detach().double()
    return scale, shift


def _scale_output_channels(w: Tensor, scale: Tensor, transposed: bool, groups: int) -> Tensor:
    """w with output channel o multiplied by scale[o]; w and scale float64."""
    if not transposed:  # (C_out, C_in/G, *k)
        return w * scale.reshape(-1, *[1] * (w.dim() - 1))
    c_in, c_out_per_group = w.shape[:2]
    kernel = w.shape[2:]
    w = w.reshape(groups, c_in // groups, c_out_per_group, *kernel)  # (G, C_in/G, C_out/G, *k)
    s = scale.reshape(groups, 1, c_out_per_group, *[1] * len(kernel))
    return (w * s).reshape(c_in, c_out_per_group, *kernel)


def fold_bn_weights(w: Tensor, b: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                    gamma: Tensor | None, beta: Tensor | None, *, transposed: bool = False,
                    groups: int = 1) -> tuple[Tensor, Tensor]:
    """(w, b) of layer-then-BN as one layer: bn(layer(x)) == layer'(x) in eval mode.

    w' = w * scale[o] for output channel o; b' = b * scale + shift (b = 0 when the layer has none).
    transposed=True for ConvTranspose weights (C_in, C_out/groups, *k). Returns w's dtype.
    """
    c_out = w.shape[1] * groups if transposed else w.shape[0]
    if mean.numel() != c_out:
        raise ValueError(f"batch norm has {mean.numel()} channels but the layer before it has "
                         f"{c_out} output channels; they must match to fold")
    scale, shift = bn_scale_shift(mean, var, eps, gamma, beta)
    w_folded = _scale_output_channels(w.detach().double(), scale, transposed, groups)
    b_folded = shift if b is None else b.detach().double() * scale + shift
    return w_folded.to(w.dtype), b_folded.to(w.dtype)


def fold_bn_into_next_weights(w: Tensor, b: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                              gamma: Tensor | None, beta: Tensor | None, *,
                              groups: int = 1) -> tuple[Tensor, Tensor]:
    """(w, b) of BN-then-layer as one layer: layer(bn(x)) == layer'(x) in eval mode.

    For a Linear (C_out, C_in) or a non-transposed conv (C_out, C_in/groups, *k) whose every
    output reads only inside its input (no zero padding: a padded zero is not bn(anything)):
    w'[o, j, k] = w[o, j, k] * scale[i] and b'[o] = b[o] + sum_{j,k} w[o, j, k] * shift[i],
    with i = g(o) * C_in/groups + j the input channel that weight row reads.
    """
    c_out, c_in_per_group = w.shape[:2]
    if mean.numel() != c_in_per_group * groups:
        raise ValueError(f"batch norm has {mean.numel()} channels but the layer after it reads "
                         f"{c_in_per_group * groups} input channels; they must match to fold")
    scale, shift = bn_scale_shift(mean, var, eps, gamma, beta)
    wg = w.detach().double().reshape(groups, c_out // groups, c_in_per_group, -1)  # (G,O/G,I/G,K)
    w_folded = (wg * scale.reshape(groups, 1, c_in_per_group, 1)).reshape(w.shape)
    b_extra = (wg * shift.reshape(groups, 1, c_in_per_group, 1)).sum((2, 3)).reshape(c_out)
    b_folded = b_extra if b is None else b.detach().double() + b_extra
    return w_folded.to(w.dtype), b_folded.to(w.dtype)


def absorb_bias(running_mean: Tensor, channel_bias: Tensor) -> Tensor:
    """running_mean of a BN whose input loses the per-channel constant channel_bias.

    Removing c from every input shifts each batch mean by -c and leaves every variance alone, and
    the running mean is an average of batch means with weights summing to 1 (momentum or the
    cumulative 1/n), so running_mean - c stays exactly the running mean of the stripped model.
    """
    return (running_mean.detach().double() - channel_bias.double()).to(running_mean.dtype)
