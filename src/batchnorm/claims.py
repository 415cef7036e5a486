"""`batchnorm claims`: the batch-norm study note's claims, each checked numerically.

Every claim is a function `check_*(seed) -> ClaimResult` that builds a small case with this
package's own modules and functional API (cross-checked against batchnorm.reference where a
formula is involved), measures the figures the claim is about, and decides whether it holds.
Nothing is canned: the table prints what was measured on this run.

    1. after normalization each channel has mean 0 and variance v / (v + eps)
    2. gamma = sqrt(var + eps), beta = mean gives back the input
    3. adding a constant, or scaling by a positive one, leaves the normalized output unchanged
    4. in training mode a conv/linear bias before BN is cancelled (same output, zero gradient)
    5. in eval mode it is not: running_mean does not subtract it, unless you subtract it yourself
    6. torch.var is unbiased by default; BN normalizes with the biased variance and stores the
       unbiased one in running_var

All checks run in float64, so "equal" means within TOL (order-1 values that agree to ~1e-15, with
margin for sums over a few hundred terms).
"""

import argparse
import copy
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

import batchnorm
from batchnorm import kernels, reference
from batchnorm.functional import batch_norm

__all__ = ["ClaimResult", "CHECKS", "run_checks", "format_table", "add_arguments", "run"]

DTYPE = torch.float64
TOL = 1e-10  # "equal" in float64, the only dtype the checks run in
EPS = 1e-5  # torch's default


@dataclass
class ClaimResult:
    """One row of the table: the claim, how it was checked, what was measured, the verdict."""

    number: int
    claim: str
    method: str
    measured: str
    holds: bool
    figures: dict[str, float | bool] = field(default_factory=dict)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


def _max_abs(a: torch.Tensor, b: torch.Tensor | float = 0.0) -> float:
    return float((a - b).detach().abs().max())


def _channel_stats(x: torch.Tensor, unbiased: bool = False):
    """Per-channel mean and variance of (N, C, *) input."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=unbiased)


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


# ----------------------------------------------------------------------------------------------
# The claims


def check_normalized_moments(seed: int = 0) -> ClaimResult:
    """Claim 1: BatchNorm2d(affine=False) output has per-channel mean 0, variance v / (v + eps)."""
    g = _generator(seed)
    # channel standard deviations 10 .. 1e-3: the last channel's variance (~1e-6) is below eps,
    # where eps visibly pulls the output variance below 1
    stds = torch.tensor([10.0, 1.0, 0.1, 1e-3], dtype=DTYPE)
    x = _randn(g, 8, 4, 5, 5) * _view(stds, _randn(g, 8, 4, 5, 5)) + 3.0
    module = batchnorm.BatchNorm2d(4, eps=EPS, affine=False).to(DTYPE).train()
    with torch.no_grad():
        y = module(x)
    mean_y, var_y = _channel_stats(y)
    _, var_x = _channel_stats(x)
    expected_var = var_x / (var_x + EPS)
    y_ref, _ = reference.train_forward(x.numpy(), eps=EPS)
    figures = {
        "max_abs_mean": _max_abs(mean_y),
        "max_abs_var_minus_v_over_v_plus_eps": _max_abs(var_y, expected_var),
        "max_abs_var_minus_1_when_v_gt_100eps": _max_abs(var_y[var_x > 100 * EPS], 1.0),
        "var_smallest_channel": float(var_y[-1]),
        "v_over_v_plus_eps_smallest_channel": float(expected_var[-1]),
        "max_abs_error_vs_reference": _max_abs(y, torch.from_numpy(y_ref)),
    }
    holds = (figures["max_abs_mean"] <= TOL
             and figures["max_abs_var_minus_v_over_v_plus_eps"] <= TOL
             and figures["max_abs_error_vs_reference"] <= TOL)
    return ClaimResult(
        1, "After normalization each channel has mean 0 and variance 1 (up to eps: v/(v+eps))",
        "BatchNorm2d(4, affine=False), train, x (8,4,5,5) with channel std 10..1e-3; "
        "biased moments of the output; output vs reference.train_forward",
        f"max|mean| {figures['max_abs_mean']:.1e}; max|var - v/(v+eps)| "
        f"{figures['max_abs_var_minus_v_over_v_plus_eps']:.1e}; channel with v=1e-6: var "
        f"{figures['var_smallest_channel']:.4f}; vs reference "
        f"{figures['max_abs_error_vs_reference']:.1e}",
        holds, figures)


def check_identity_recovery(seed: int = 0) -> ClaimResult:
    """Claim 2: weight = sqrt(var + eps), bias = mean (the batch's biased statistics) undo BN."""
    g = _generator(seed)
    x = _randn(g, 6, 3, 4, 4) * 2.5 - 7.0
    mean, var = _channel_stats(x)
    module = batchnorm.BatchNorm2d(3, eps=EPS).to(DTYPE).train()
    with torch.no_grad():
        module.weight.copy_(torch.sqrt(var + EPS))
        module.bias.copy_(mean)
        y = module(x)
    y_ref, _ = reference.train_forward(x.numpy(), np.sqrt(var.numpy() + EPS), mean.numpy(), EPS)
    scale = float(x.abs().max())
    figures = {
        "max_abs_error": _max_abs(y, x),
        "max_abs_error_reference": float(np.abs(y_ref - x.numpy()).max()),
        "max_abs_input": scale,
    }
    holds = max(figures["max_abs_error"], figures["max_abs_error_reference"]) <= TOL * scale
    return ClaimResult(
        2, "gamma = sqrt(var + eps), beta = mean gives back the input",
        "BatchNorm2d(3), train, weight/bias set from x's biased batch statistics, x (6,3,4,4); "
        "same with reference.train_forward",
        f"max|y - x| {figures['max_abs_error']:.1e} (ours), "
        f"{figures['max_abs_error_reference']:.1e} (reference), for max|x| {scale:.1f}",
        holds, figures)


def check_shift_scale_invariance(seed: int = 0) -> ClaimResult:
    """Claim 3: x + c and a * x (a > 0) normalize to the same output as x.

    Shifting is exact. Scaling is exact when eps scales too (eps * a^2); with eps fixed the output
    moves by the eps effect, at most max|x_hat| * |sqrt((v + eps) / (v + eps / a^2)) - 1|.
    """
    g = _generator(seed)
    x = _randn(g, 8, 3, 6) * 1.5 + 0.5
    shift, scale = -42.0, 3.7

    def normalize(inp, eps=EPS):
        return batch_norm(inp, None, None, training=True, eps=eps)

    y = normalize(x)
    _, var = _channel_stats(x)
    eps_effect = float(((var + EPS) / (var + EPS / scale**2)).sqrt().sub(1.0).abs().max())
    bound = eps_effect * float(y.abs().max())
    figures = {
        "max_abs_diff_shift": _max_abs(normalize(x + shift), y),
        "max_abs_diff_scale_eps_scaled": _max_abs(normalize(scale * x, EPS * scale**2), y),
        "max_abs_diff_scale_eps_fixed": _max_abs(normalize(scale * x), y),
        "eps_effect_bound": bound,
    }
    holds = (figures["max_abs_diff_shift"] <= TOL
             and figures["max_abs_diff_scale_eps_scaled"] <= TOL
             and figures["max_abs_diff_scale_eps_fixed"] <= bound + TOL)
    return ClaimResult(
        3, "Adding a constant and scaling by a positive constant leave the normalized output "
        "unchanged",
        f"functional.batch_norm, train, x (8,3,6) vs x{shift:+g} and {scale:g}*x (eps fixed, "
        f"and eps*{scale:g}^2)",
        f"shift: max diff {figures['max_abs_diff_shift']:.1e}; scale: "
        f"{figures['max_abs_diff_scale_eps_scaled']:.1e} (eps scaled), "
        f"{figures['max_abs_diff_scale_eps_fixed']:.1e} (eps fixed, eps bound {bound:.1e})",
        holds, figures)


def _layer_pair(kind: str, g: torch.Generator):
    """(layer with bias, same layer without bias, fresh BN, input) sharing all weights."""
    with_bias: nn.Conv2d | nn.Linear
    without: nn.Conv2d | nn.Linear
    bn: batchnorm.BatchNorm1d | batchnorm.BatchNorm2d
    if kind == "conv2d":
        with_bias, without = nn.Conv2d(3, 4, 3, bias=True), nn.Conv2d(3, 4, 3, bias=False)
        bn, x = batchnorm.BatchNorm2d(4), _randn(g, 4, 3, 6, 6)
    else:
        with_bias, without = nn.Linear(5, 4, bias=True), nn.Linear(5, 4, bias=False)
        bn, x = batchnorm.BatchNorm1d(4), _randn(g, 8, 5)
    with_bias, without, bn = with_bias.to(DTYPE), without.to(DTYPE), bn.to(DTYPE)
    assert with_bias.bias is not None
    with torch.no_grad():
        with_bias.weight.copy_(_randn(g, *with_bias.weight.shape))
        with_bias.bias.copy_(_randn(g, *with_bias.bias.shape) * 2.0)
        without.weight.copy_(with_bias.weight)
        bn.weight.copy_(_randn(g, 4))
        bn.bias.copy_(_randn(g, 4))
    return with_bias, without, bn, x


def check_bias_cancelled_in_training(seed: int = 0, between: nn.Module | None = None
                                     ) -> ClaimResult:
    """Claim 4: layer(bias) -> BN and layer(no bias) -> BN agree in training mode; the bias's
    gradient is zero. `between` is a module put between layer and BN (for example a ReLU, which
    breaks the claim: the bias no longer shifts every value of a channel by the same amount)."""
    g = _generator(seed)
    figures: dict[str, float | bool] = {}
    for kind in ("conv2d", "linear"):
        with_bias, without, bn, x = _layer_pair(kind, g)
        middle = between if between is not None else nn.Identity()
        model_bias = nn.Sequential(with_bias, copy.deepcopy(middle), copy.deepcopy(bn)).train()
        model_plain = nn.Sequential(without, copy.deepcopy(middle), copy.deepcopy(bn)).train()
        y_bias, y_plain = model_bias(x), model_plain(x)
        upstream = _randn(g, *y_bias.shape)
        (y_bias * upstream).sum().backward()
        (y_plain * upstream).sum().backward()
        figures[f"{kind}_max_abs_output_diff"] = _max_abs(y_bias, y_plain)
        figures[f"{kind}_max_abs_bias_grad"] = _max_abs(with_bias.bias.grad)
        figures[f"{kind}_max_abs_weight_grad_diff"] = _max_abs(with_bias.weight.grad,
                                                               without.weight.grad)
    holds = all(value <= TOL for value in figures.values())
    name = "none" if between is None else type(between).__name__
    return ClaimResult(
        4, "In training mode a conv/linear bias before BN is cancelled (same outputs, the bias "
        "gets zero gradient)",
        f"Conv2d(3,4,3)+BatchNorm2d and Linear(5,4)+BatchNorm1d, bias=True vs bias=False, same "
        f"weights, train; forward + backward of a random upstream gradient (in between: {name})",
        f"max output diff {max(figures['conv2d_max_abs_output_diff'], figures['linear_max_abs_output_diff']):.1e}; "  # noqa: E501
        f"max|bias grad| {max(figures['conv2d_max_abs_bias_grad'], figures['linear_max_abs_bias_grad']):.1e}; "  # noqa: E501
        f"weight grad diff {max(figures['conv2d_max_abs_weight_grad_diff'], figures['linear_max_abs_weight_grad_diff']):.1e}",  # noqa: E501
        holds, figures)


def check_bias_not_cancelled_in_eval(seed: int = 0, train_steps: int = 3) -> ClaimResult:
    """Claim 5: in eval mode the bias passes through BN, freshly initialized or after a few
    training steps (running_mean has absorbed only 1 - 0.9^steps of it); using running_mean - bias
    in the bias-free model (what stripping the bias must do) makes the two equal again."""
    g = _generator(seed)
    conv_bias, conv_plain, bn, x = _layer_pair("conv2d", g)
    bn_bias, bn_plain = copy.deepcopy(bn), copy.deepcopy(bn)
    model_bias = nn.Sequential(conv_bias, bn_bias)
    model_plain = nn.Sequential(conv_plain, bn_plain)
    figures: dict[str, float | bool] = {}

    def compare(stage: str) -> None:
        model_bias.eval(), model_plain.eval()
        with torch.no_grad():
            y_bias, y_plain = model_bias(x), model_plain(x)
            figures[f"{stage}_max_abs_diff"] = _max_abs(y_bias, y_plain)
            figures[f"{stage}_allclose"] = torch.allclose(y_bias, y_plain)
            saved = bn_plain.running_mean.clone()
            bn_plain.running_mean.copy_(bn_bias.running_mean - conv_bias.bias)
            y_fixed = model_plain(x)
            bn_plain.running_mean.copy_(saved)
        figures[f"{stage}_corrected_max_abs_diff"] = _max_abs(y_bias, y_fixed)
        figures[f"{stage}_corrected_allclose"] = torch.allclose(y_bias, y_fixed)

    compare("fresh")
    with torch.no_grad():
        for _ in range(train_steps):
            batch = _randn(g, *x.shape)
            model_bias.train()(batch), model_plain.train()(batch)
    absorbed = (bn_bias.running_mean - bn_plain.running_mean) / conv_bias.bias.detach()
    figures["fraction_of_bias_in_running_mean"] = float(absorbed.mean())
    compare("trained")
    holds = (not figures["fresh_allclose"] and not figures["trained_allclose"]
             and figures["fresh_corrected_max_abs_diff"] <= TOL
             and figures["trained_corrected_max_abs_diff"] <= TOL)
    return ClaimResult(
        5, "In eval mode the two differ (allclose False): running_mean does not subtract the "
        "bias; subtracting the bias from running_mean makes them equal",
        f"Conv2d(3,4,3)+BatchNorm2d bias=True vs False, eval, fresh BN and after {train_steps} "
        f"train steps; then the bias-free BN given running_mean - bias",
        f"fresh: max diff {figures['fresh_max_abs_diff']:.2f} "
        f"(allclose {figures['fresh_allclose']}); after {train_steps} steps "
        f"{figures['trained_max_abs_diff']:.2f} (allclose {figures['trained_allclose']}, "
        f"running_mean holds {figures['fraction_of_bias_in_running_mean']:.3f} of the bias); "
        f"corrected: {max(figures['fresh_corrected_max_abs_diff'], figures['trained_corrected_max_abs_diff']):.1e}",  # noqa: E501
        holds, figures)


def check_biased_and_unbiased_variance(seed: int = 0) -> ClaimResult:
    """Claim 6: torch.var divides by m - 1; BN normalizes with the m-divided variance and stores
    the (m - 1)-divided one in running_var (momentum=1.0 makes running_var the batch's value)."""
    g = _generator(seed)
    x = _randn(g, 2, 3, 2, 2) * 2.0 + 1.0  # m = 8 values per channel: m/(m-1) = 1.143
    m = x.numel() // x.shape[1]
    mean, var_biased = _channel_stats(x, unbiased=False)
    var_default = x.transpose(0, 1).reshape(3, -1).var(dim=1)  # torch.var's default
    module = batchnorm.BatchNorm2d(3, eps=EPS, affine=False, momentum=1.0).to(DTYPE).train()
    with torch.no_grad():
        y = module(x)
    x_hat_biased = (x - _view(mean, x)) / _view(torch.sqrt(var_biased + EPS), x)
    x_hat_unbiased = (x - _view(mean, x)) / _view(torch.sqrt(var_default + EPS), x)
    _, ref_var, _ = reference.update_running_stats(
        np.zeros(3), np.ones(3), mean.numpy(), var_biased.numpy(), m, momentum=1.0)
    running_var = module.running_var
    assert running_var is not None  # track_running_stats=True
    figures = {
        "m": m,
        "torch_var_ratio_minus_m_over_m_minus_1": _max_abs(var_default / var_biased, m / (m - 1)),
        "output_vs_biased_normalization": _max_abs(y, x_hat_biased),
        "output_vs_unbiased_normalization": _max_abs(y, x_hat_unbiased),
        "running_var_vs_unbiased": _max_abs(running_var, var_default),
        "running_var_vs_biased": _max_abs(running_var, var_biased),
        "running_var_vs_reference": _max_abs(running_var, torch.from_numpy(ref_var)),
    }
    holds = (figures["torch_var_ratio_minus_m_over_m_minus_1"] <= TOL
             and figures["output_vs_biased_normalization"] <= TOL
             and figures["output_vs_unbiased_normalization"] > 1e3 * TOL
             and figures["running_var_vs_unbiased"] <= TOL
             and figures["running_var_vs_biased"] > 1e3 * TOL
             and figures["running_var_vs_reference"] <= TOL)
    return ClaimResult(
        6, "torch.var is unbiased by default while BN normalizes with the biased variance; "
        "running_var stores the unbiased one",
        f"x (2,3,2,2), m={m}: torch.var / var(unbiased=False); BatchNorm2d(affine=False, "
        f"momentum=1) output and running_var vs both variances and reference",
        f"torch.var ratio - m/(m-1) {figures['torch_var_ratio_minus_m_over_m_minus_1']:.1e}; "
        f"output vs biased {figures['output_vs_biased_normalization']:.1e}, vs unbiased "
        f"{figures['output_vs_unbiased_normalization']:.1e}; running_var vs unbiased "
        f"{figures['running_var_vs_unbiased']:.1e}, vs biased "
        f"{figures['running_var_vs_biased']:.1e}",
        holds, figures)


CHECKS = (
    check_normalized_moments,
    check_identity_recovery,
    check_shift_scale_invariance,
    check_bias_cancelled_in_training,
    check_bias_not_cancelled_in_eval,
    check_biased_and_unbiased_variance,
)


def run_checks(seed: int = 0, backend: str = "composite") -> list[ClaimResult]:
    """Every check, on the kernel backend `backend`: "composite" (the same custom ops in torch
    operations) or "auto" (the kernels registered per device)."""
    if backend not in ("composite", "auto"):
        raise ValueError(f"backend must be 'composite' or 'auto', got {backend!r}")
    with kernels.use(None if backend == "auto" else backend):
        return [check(seed=seed) for check in CHECKS]


# ----------------------------------------------------------------------------------------------
# Output


COLUMNS = (("#", 2), ("claim", 34), ("how it was checked", 42), ("measured", 46), ("holds", 5))


def format_table(results: list[ClaimResult]) -> str:
    """A plain-text table, long cells wrapped within their column."""
    header = " | ".join(f"{name:<{width}}" for name, width in COLUMNS)
    rule = "-+-".join("-" * width for _, width in COLUMNS)
    lines = [header, rule]
    for result in results:
        cells = (str(result.number), result.claim, result.method, result.measured,
                 "yes" if result.holds else "NO")
        wrapped = [textwrap.wrap(cell, width) or [""] for cell, (_, width) in zip(cells, COLUMNS,
                                                                                 strict=True)]
        for row in range(max(map(len, wrapped))):
            lines.append(" | ".join(f"{(col[row] if row < len(col) else ''):<{width}}"
                                    for col, (_, width) in zip(wrapped, COLUMNS, strict=True)))
        lines.append(rule)
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random input (0)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the table as JSON to PATH")
    parser.add_argument("--kernels", choices=("composite", "auto", "torch"), default="composite",
                        help="kernel backend: composite, the ops in torch operations (default; "
                             "'torch' is its earlier name), or auto, the kernels registered per "
                             "device (C++ on CPU)")


def run(args: argparse.Namespace) -> int:
    if args.kernels == "torch":  # the earlier name of the composite
        args.kernels = "composite"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        results = run_checks(args.seed, args.kernels)
    finally:
        torch.set_num_threads(torch_threads)
    print(f"batchnorm claims (seed {args.seed}, kernels: {args.kernels}, float64)\n")
    print(format_table(results))
    failed = [r.number for r in results if not r.holds]
    print(f"\n{len(results) - len(failed)} of {len(results)} claims hold"
          + (f"; failed: {', '.join(map(str, failed))}" if failed else ""))
    if args.json:
        records = []
        for r in results:
            record = asdict(r)
            record["figures"] = {k: _jsonable(v) for k, v in r.figures.items()}
            records.append(record)
        payload = {"seed": args.seed, "kernels": args.kernels, "torch": torch.__version__,
                   "all_hold": not failed,
                   "claims": records}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return 1 if failed else 0
