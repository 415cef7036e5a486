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


def _pool_bn_inputs(model: nn.Module, batches: Iterable[Any], training: bool,
                    order: list[str] | None = None):
    """{name: _Pooled} of every BN's input over batches, in first-call order, and the batch
    count; order, when given, receives the names of BN and dropout modules (p > 0) in the
    order they first ran. Every buffer of the model is restored afterwards, and every module's
    mode; the global random state too (a training-mode run draws dropout masks)."""
    bns = {m: name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    dropouts = {m: name for name, m in model.named_modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0}
    pooled: dict[str, _Pooled] = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        pooled.setdefault(bns[module], _Pooled()).add(x)
        if order is not None and bns[module] not in order:
            order.append(bns[module])

    def dropout_hook(module, args):
        if order is not None and dropouts[module] not in order:
            order.append(dropouts[module])

    flags = {m: m.training for m in model.modules()}
    saved = {name: b.clone() for name, b in model.named_buffers()}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in bns]
    handles += [m.register_forward_pre_hook(dropout_hook) for m in dropouts]
    n_batches = 0
    try:
        model.train(training)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
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


def recalibrate(model: nn.Module, batches: Iterable[Any], *,
                mode: str = "train") -> RecalibrationReport:
    """Recompute every BN's running_mean / running_var, in place, from batches ("precise BN").

    mode="train" (the default): the model runs in training mode (as during training: each BN's
    input is normalized upstream with batch statistics), without gradients; each BN's
    running_mean becomes the mean and running_var the unbiased variance of its input pooled
    over all samples of all batches.

    mode="eval": each BN's statistics are those of its input with the model in eval mode, as it
    is used for inference: dropout off, the BN layers before it normalizing with their (already
    re-estimated) running statistics. A layer's eval-mode input depends on the layers before it,
    so the layers are re-estimated one after the other in the order they run, one pass over the
    batches each. This is the remedy when a layer's input differs between the modes (dropout
    before it, or batch statistics that vary between batches upstream), which diagnose reports;
    mode="train" leaves such a layer's eval-mode input undescribed.

    Parameters, momentum, num_batches_tracked, every other buffer and every module's training
    flag are left as they were. A batch is a tensor, a tuple (model(*batch)) or a dict.

    num_batches_tracked is kept because it counts training steps, and with momentum=None the
    next training step weights its batch 1 / (num_batches_tracked + 1) against the running
    statistics (at 0 that step replaces them, as it would have without recalibrating);
    inventing a count for the pooled statistics would change that weighting.
    diagnose judges the recalibrated statistics by their values, so a model recalibrated on
    batches is reported healthy on them even when it was never trained.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"recalibrate's mode is 'train' or 'eval', got {mode!r}")
    batches = list(batches)  # several passes in eval mode
    pooled, n_batches = _pool_bn_inputs(model, batches, training=mode == "train")
    modules = dict(model.named_modules())
    layers: list[str] = []
    samples: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    for name, m in modules.items():
        if not isinstance(m, _BatchNorm):
            continue
        if m.running_mean is None or m.running_var is None:
            skipped.append((name, "no running statistics (track_running_stats=False)"))
        elif name not in pooled:
            skipped.append((name, "not called on these batches"))
    for name in list(pooled):  # the order the layers first ran
        m = modules[name]
        if m.running_mean is None or m.running_var is None:
            continue
        if mode == "eval" and layers:  # the layers before it have changed: pool its input again
            pooled, _ = _pool_bn_inputs(model, batches, training=False)
        stats = pooled[name]
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
    # the same two numbers for the layer's input with the model in training mode
    train_mean_shift: float = 0.0
    train_var_ratio: float = 1.0
    # "" (not flagged); "initial": running statistics at their initial (0, 1), never updated;
    # "modes": they fit the training-mode input, the eval-mode input differs; "data": they fit
    # neither (other data, other preprocessing, or statistics from elsewhere)
    cause: str = ""


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


def _compare(stats: _Pooled, m: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Per channel: |data mean - running_mean| in running sd, and (data var + eps) / (running_var
    + eps)."""
    assert m.running_mean is not None and m.running_var is not None and stats.mean is not None
    rm, rv = m.running_mean.double(), m.running_var.double()
    shift = (stats.mean - rm).abs() / torch.sqrt(rv + m.eps)
    ratio = (stats.var() + m.eps) / (rv + m.eps)
    return shift, ratio


def diagnose(model: nn.Module, batches: Iterable[Any], *, mean_threshold: float = 0.5,
             var_ratio_threshold: float = 2.0) -> Diagnosis:
    """Compare, per BN layer, the statistics of its input on batches (the model in eval mode, as
    it is used) with its running statistics, flag layers they do not describe, and say why.

    A layer is flagged when some channel's data mean lies more than mean_threshold running
    standard deviations from running_mean, or its data variance is more than
    var_ratio_threshold times larger or smaller than running_var. The statistics alone decide
    the flag. The cause is read off a second run of the batches in training mode:

    - "modes": the running statistics fit the layer's training-mode input: its input differs
      between the modes, because layers before it act differently in eval (dropout; BN layers
      normalizing with running instead of batch statistics, which differ when batch
      statistics vary between batches). recalibrate(model, batches) would change nothing
      (it pools training-mode inputs); recalibrate(model, batches, mode="eval") fits them to
      the eval-mode inputs.
    - "initial": the running statistics are still (0, 1) with num_batches_tracked = 0: never
      updated. The counter alone says nothing: recalibrate keeps it at 0 and weights converted
      from other frameworks arrive with it at 0, so a 0 with other statistics is not "never
      updated".
    - "data": they fit neither: the batches differ from what the statistics were made on.

    The model's state, modes and the global random state are left as they were.
    """
    batches = list(batches)  # two passes
    order: list[str] = []
    pooled, _ = _pool_bn_inputs(model, batches, training=False, order=order)
    pooled_train, _ = _pool_bn_inputs(model, batches, training=True)
    modules = dict(model.named_modules())
    layers, not_checked = [], []
    for name, m in modules.items():
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            not_checked.append((name, "no running statistics: eval uses batch statistics"))
        elif isinstance(m, _BatchNorm) and name not in pooled:
            not_checked.append((name, "not called on these batches"))
    log_var_threshold = math.log(var_ratio_threshold)
    for name, stats in pooled.items():
        m = modules[name]
        assert isinstance(m, _BatchNorm)
        if m.running_mean is None or m.running_var is None:
            continue
        shift, ratio = _compare(stats, m)
        log_ratio = ratio.log().abs()
        c_shift, c_ratio = int(shift.argmax()), int(log_ratio.argmax())
        tracked = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
        reasons = []  # the statistics alone decide; the cause only explains (see docstring)
        if shift[c_shift] > mean_threshold:
            reasons.append(f"mean off by {float(shift[c_shift]):.3g} sd in channel {c_shift}")
        if log_ratio[c_ratio] > log_var_threshold:
            reasons.append(f"variance x{float(ratio[c_ratio]):.3g} in channel {c_ratio}")
        train_shift, train_ratio = _compare(pooled_train[name], m)
        worst_train_ratio = float(train_ratio[train_ratio.log().abs().argmax()])
        fits_training = (float(train_shift.max()) <= mean_threshold
                         and abs(math.log(worst_train_ratio)) <= log_var_threshold)
        initial = (tracked == 0 and bool((m.running_mean == 0).all())
                   and bool((m.running_var == 1).all()))
        cause = ""
        if reasons and initial:
            cause = "initial"
            reasons.insert(0, "never updated (running statistics (0, 1), num_batches_tracked = 0)")
        elif reasons and fits_training:
            cause = "modes"
            reasons.append(f"its training-mode input fits them (mean shift "
                           f"{float(train_shift.max()):.2g} sd, variance x{worst_train_ratio:.3g})"
                           f": its input differs between training and eval mode")
        elif reasons:
            cause = "data"
        layers.append(LayerDiagnosis(name, m.num_features, tracked, float(shift[c_shift]),
                                     c_shift, float(ratio[c_ratio]), c_ratio, bool(reasons),
                                     "; ".join(reasons), float(train_shift.max()),
                                     worst_train_ratio, cause))
    summary = _summarize(layers, order, modules, mean_threshold, var_ratio_threshold)
    return Diagnosis(layers, not_checked, summary)


def _mode_dependent_before(first: str, order: list[str], modules: dict[str, nn.Module]) -> str:
    """The layers that ran before `first` and act differently in eval mode, in words."""
    before = order[:order.index(first)] if first in order else []
    dropouts = [f"{n} (p={modules[n].p})" for n in before
                if isinstance(modules[n], nn.modules.dropout._DropoutNd)]
    bns = [n for n in before if isinstance(modules[n], _BatchNorm)
           and getattr(modules[n], "running_mean", None) is not None]
    parts = []
    if dropouts:
        parts.append(f"dropout {', '.join(dropouts[:3])}{' ...' if len(dropouts) > 3 else ''} "
                     f"(off in eval)")
    if bns:
        parts.append(f"{len(bns)} BN layer{'s' if len(bns) > 1 else ''} "
                     f"({', '.join(bns[-3:])}{' ...' if len(bns) > 3 else ''}) normalizing with "
                     f"running statistics in eval and with each batch's in training")
    return " and ".join(parts) if parts else "layers before it that act differently in eval mode"


def _summarize(layers: list[LayerDiagnosis], order: list[str], modules: dict[str, nn.Module],
               mean_threshold: float, var_threshold: float) -> str:
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
             f"describe these batches in eval mode. The first to run is {first.name}: "
             f"{first.why}. Layers after it see its error, so fix from there."]
    if first.cause == "modes":
        upstream = _mode_dependent_before(first.name, order, modules)
        lines.append(
            f"- Cause: the running statistics are right for the training-mode input; in eval "
            f"mode the input differs, because of {upstream}. recalibrate(model, batches) "
            f"would not change this: it pools training-mode inputs, which these statistics "
            f"already describe.")
        lines.append(
            "- If the model is used in eval mode on such data, fit each layer's statistics to its "
            "eval-mode input, layer after layer: batchnorm.tools.recalibrate(model, batches, "
            "mode=\"eval\"). Batch statistics that vary a lot between batches (small or "
            "correlated batches) are what makes BN layers differ between the modes: larger, "
            "shuffled batches in training reduce it.")
        return "\n".join(lines)
    if first.cause == "initial":
        lines.append("- They were never updated: the model was never run in train() mode on data, "
                     "or the state_dict loaded missed their buffers.")
    lines.append("- If these batches are what the model should handle, re-estimate the statistics: "
                 "batchnorm.tools.recalibrate(model, batches) (parameters stay as they are).")
    lines.append("- Otherwise check that preprocessing (scale, mean/std normalization, channel "
                 "order) matches training, and that training batches were not tiny or correlated "
                 "(batch size 1-2, one class per batch), which makes batch and running statistics "
                 "disagree.")
    return "\n".join(lines)
