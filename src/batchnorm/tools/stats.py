"""Running statistics against data: recalibrate them ("precise BN") and diagnose them.

Both run the model over given batches with a forward pre-hook on every BN layer that pools the
per-channel statistics of the layer's input over all batches, exactly, in float64 (Chan et al.'s
pairwise update of count, mean and M2, so no batch's size or mean is lost):

    mean = sum over all samples / n
    var  = M2 / (n - 1)       the unbiased variance of all n samples pooled, which is what
                              running_var estimates; NOT the average of per-batch variances,
                              which misses the spread between batch means.

A "sample" is one position of the channel: N * L (1d), N * H * W (2d), N * D * H * W (3d).
"""

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate", "RecalibrationReport", "diagnose", "Diagnosis", "LayerDiagnosis"]


class _Pooled:
    """count, mean and M2 per channel over every batch seen so far, float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, samples)
        n_b = x.shape[1]
        if n_b == 0:
            return
        mean_b = x.mean(1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(1)
        if self.mean is None or self.m2 is None:  # the first batch: both are None until then
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.count * n_b / n)
        self.count = n

    def var(self) -> Tensor:
        assert self.m2 is not None, "var() of a _Pooled that saw no samples"
        return self.m2 / (self.count - 1)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _pool_bn_inputs(model: nn.Module, batches: Iterable[Any], training: bool):
    """{name: _Pooled} of every BN's input over batches, in first-call order, and the batch
    count. Every buffer of the model is restored afterwards, and every module's mode."""
    bns = {m: name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    pooled: dict[str, _Pooled] = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        pooled.setdefault(bns[module], _Pooled()).add(x)

    flags = {m: m.training for m in model.modules()}
    saved = {name: b.clone() for name, b in model.named_buffers()}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in bns]
    n_batches = 0
    try:
        model.train(training)
        with torch.no_grad():
            for batch in batches:
                _call(model, batch)
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    if n_batches == 0:
        raise ValueError("no batches were given; pass an iterable of at least one batch")
    return pooled, n_batches


@dataclasses.dataclass
class RecalibrationReport:
    layers: list[str]  # BN layers whose running statistics were recomputed
    samples: dict[str, int]  # per layer, the n the statistics pool
    batches: int
    skipped: list[tuple[str, str]]


def recalibrate(model: nn.Module, batches: Iterable[Any]) -> RecalibrationReport:
    """Recompute every BN's running_mean / running_var, in place, from batches ("precise BN").

    The model runs in training mode (as during training: each BN's input is normalized upstream
    with batch statistics), without gradients; each BN's running_mean becomes the mean and
    running_var the unbiased variance of its input pooled over all samples of all batches.
    Parameters, momentum, num_batches_tracked, every other buffer and every module's
    training flag are left as they were. A batch is a tensor, a tuple (model(*batch)) or a dict.

    num_batches_tracked is kept because it counts training steps, and with momentum=None the
    next training step weights its batch 1 / (num_batches_tracked + 1) against the running
    statistics (at 0 that step replaces them, as it would have without recalibrating);
    inventing a count for the pooled statistics would change that weighting.
    diagnose judges the recalibrated statistics by their values, so a model recalibrated on
    batches is reported healthy on them even when it was never trained.
    """
    pooled, n_batches = _pool_bn_inputs(model, batches, training=True)
    layers, samples, skipped = [], {}, []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        if m.running_mean is None or m.running_var is None:
            skipped.append((name, "no running statistics (track_running_stats=False)"))
            continue
        stats = pooled.get(name)
        if stats is None:
            skipped.append((name, "not called on these batches"))
            continue
        if stats.count < 2:
            raise ValueError(f"{name} saw {stats.count} sample per channel; an unbiased variance "
                             f"needs at least 2")
        with torch.no_grad():
            m.running_mean.copy_(stats.mean.to(m.running_mean.dtype))
            m.running_var.copy_(stats.var().to(m.running_var.dtype))
        layers.append(name)
        samples[name] = stats.count
    return RecalibrationReport(layers, samples, n_batches, skipped)


@dataclasses.dataclass
class LayerDiagnosis:
    name: str
    channels: int
    num_batches_tracked: int | None
    mean_shift: float  # max over channels of |data mean - running_mean| / sqrt(running_var + eps)
    mean_shift_channel: int
    var_ratio: float  # the channel's (data var + eps) / (running_var + eps) farthest from 1
    var_ratio_channel: int
    flagged: bool
    why: str


@dataclasses.dataclass
class Diagnosis:
    layers: list[LayerDiagnosis]  # in the order the BNs ran
    not_checked: list[tuple[str, str]]
    summary: str

    def table(self) -> str:
        lines = [f"{'layer':<28} {'C':>5} {'tracked':>8} {'mean shift (sd)':>16} "
                 f"{'var ratio':>10}  flag"]
        for d in self.layers:
            tracked = "-" if d.num_batches_tracked is None else d.num_batches_tracked
            lines.append(f"{d.name:<28} {d.channels:>5} {tracked:>8} "
                         f"{d.mean_shift:>10.3g} (c{d.mean_shift_channel:<3}) "
                         f"{d.var_ratio:>10.3g}  {'<-- ' + d.why if d.flagged else ''}")
        return "\n".join(lines)


def diagnose(model: nn.Module, batches: Iterable[Any], *, mean_threshold: float = 0.5,
             var_ratio_threshold: float = 2.0) -> Diagnosis:
    """Compare, per BN layer, the statistics of its input on batches (the model in eval mode, as
    it is used) with its running statistics, and flag layers they do not describe.

    A layer is flagged when some channel's data mean lies more than mean_threshold running
    standard deviations from running_mean, or its data variance is more than
    var_ratio_threshold times larger or smaller than running_var. The statistics alone decide:
    num_batches_tracked == 0 is named as the likely cause of a flagged layer ("never updated"),
    but does not flag one whose statistics fit, since the counter says how the statistics were
    made, not whether they are right: recalibrate sets them without counting batches, and
    weights converted from other frameworks come with the counter at 0. The model's state and
    modes are left as they were.
    """
    pooled, _ = _pool_bn_inputs(model, batches, training=False)
    modules = dict(model.named_modules())
    layers, not_checked = [], []
    for name, m in modules.items():
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            not_checked.append((name, "no running statistics: eval uses batch statistics"))
        elif isinstance(m, _BatchNorm) and name not in pooled:
            not_checked.append((name, "not called on these batches"))
    for name, stats in pooled.items():
        m = modules[name]
        if m.running_mean is None or m.running_var is None:
            continue
        rm, rv = m.running_mean.double(), m.running_var.double()
        shift = (stats.mean - rm).abs() / torch.sqrt(rv + m.eps)
        ratio = (stats.var() + m.eps) / (rv + m.eps)
        log_ratio = ratio.log().abs()
        c_shift, c_ratio = int(shift.argmax()), int(log_ratio.argmax())
        tracked = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
        reasons = []  # the statistics alone decide; the counter only explains (see docstring)
        if shift[c_shift] > mean_threshold:
            reasons.append(f"mean off by {float(shift[c_shift]):.3g} sd in channel {c_shift}")
        if log_ratio[c_ratio] > math.log(var_ratio_threshold):
            reasons.append(f"variance x{float(ratio[c_ratio]):.3g} in channel {c_ratio}")
        if reasons and tracked == 0:
            reasons.insert(0, "never updated (num_batches_tracked = 0)")
        layers.append(LayerDiagnosis(name, m.num_features, tracked, float(shift[c_shift]),
                                     c_shift, float(ratio[c_ratio]), c_ratio, bool(reasons),
                                     "; ".join(reasons)))
    return Diagnosis(layers, not_checked, _summarize(layers, mean_threshold, var_ratio_threshold))


def _summarize(layers: list[LayerDiagnosis], mean_threshold: float, var_threshold: float) -> str:
    if not layers:
        return "no BN layer with running statistics ran on these batches; nothing to compare"
    flagged = [d for d in layers if d.flagged]
    worst_shift = max(d.mean_shift for d in layers)
    if not flagged:
        return (f"all {len(layers)} BN layers' running statistics describe these batches (largest "
                f"mean shift {worst_shift:.2g} sd, below {mean_threshold}; variance ratios within "
                f"x{var_threshold}). If eval-mode results are still bad, look elsewhere.")
    first = flagged[0]
    lines = [f"{len(flagged)} of {len(layers)} BN layers have running statistics that do not "
             f"describe these batches. The first to run is {first.name}: {first.why}. Layers after "
             f"it see its error, so fix from there."]
    if any(d.num_batches_tracked == 0 for d in flagged):
        lines.append("- Some were never updated: the model was never run in train() mode on data, "
                     "or the state_dict loaded missed their buffers.")
    lines.append("- If these batches are what the model should handle, re-estimate the statistics: "
                 "batchnorm.tools.recalibrate(model, batches) (parameters stay as they are).")
    lines.append("- Otherwise check that preprocessing (scale, mean/std normalization, channel "
                 "order) matches training, and that training batches were not tiny or correlated "
                 "(batch size 1-2, one class per batch), which makes batch and running statistics "
                 "disagree.")
    return "\n".join(lines)
