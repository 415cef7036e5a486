"""Ghost batch norm, batch renormalization, frozen batch norm: against the NumPy reference, torch.nn
and the properties that define them."""

import copy
import importlib.util

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import family, reference
from batchnorm.distributed import SyncBatchNorm
from batchnorm.family import ghost as ghost_module
from tests.utils import assert_close, check_forward_backward, make_inputs, parameter_pairs

F64 = torch.float64


def _torch_bn(dim, channels, **kw):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[dim]
    return cls(channels, dtype=F64, **kw)


def _ghost_cls(dim):
    return {2: family.GhostBatchNorm1d, 3: family.GhostBatchNorm1d, 4: family.GhostBatchNorm2d,
            5: family.GhostBatchNorm3d}[dim]


def _renorm_cls(dim):
    return {2: family.BatchRenorm1d, 3: family.BatchRenorm1d, 4: family.BatchRenorm2d,
            5: family.BatchRenorm3d}[dim]


def _randomize_affine(module, gen):
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(module.num_features, generator=gen))


def _train_step_matches(ours, theirs, shape, seed, what):
    """One float64 training step of both modules on the same data: output, input and parameter
    gradients."""
    inputs = make_inputs(shape, F64, seed=seed)
    check_forward_backward(ours, theirs, {"input": inputs.x}, F64, reduction_size=64,
                           dy=inputs.dy, params=parameter_pairs(ours, theirs), what=what)


# ---------------------------------------------------------------------------------------------
# Ghost batch norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, virtual, sizes", [
    (10, 4, [4, 6]), (8, 4, [4, 4]), (3, 4, [3]), (9, 2, [2, 2, 2, 3]), (5, 2, [2, 3]),
    (1, 4, [1]), (7, 1, [1] * 7), (0, 3, [0]),
])
def test_ghost_chunk_sizes(batch, virtual, sizes):
    assert family.ghost_chunk_sizes(batch, virtual) == sizes
    assert sum(sizes) == batch


@pytest.mark.parametrize("virtual", [8, 100])
@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (8, 3, 4, 4), (8, 2, 2, 3, 3)])
def test_ghost_with_the_whole_batch_is_batchnorm(shape, virtual):
    gen = torch.Generator().manual_seed(0)
    ours = _ghost_cls(len(shape))(shape[1], virtual_batch_size=virtual, dtype=F64)
    theirs = _torch_bn(len(shape), shape[1])
    _randomize_affine(ours, gen)
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        _train_step_matches(ours, theirs, shape, step, f"step {step}")
    assert_close(ours.running_var, theirs.running_var, F64, 64, "running_var")
    assert_close(ours.running_mean, theirs.running_mean, F64, 64, "running_mean")
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=gen, dtype=F64)
    assert_close(ours(x), theirs(x), F64, 64, "eval output")


def _assert_step_matches(module, y, grad_input, expected, dtype, what):
    """One training step of module against the NumPy reference's results: output, input and
    parameter gradients, the running statistics (each sums a channel's 64 values)."""
    y_ref, dx_ref, dg_ref, db_ref, mean_ref, var_ref = expected
    for name, actual, wanted in (("output", y, y_ref), ("input grad", grad_input, dx_ref),
                                 ("weight grad", module.weight.grad, dg_ref),
                                 ("bias grad", module.bias.grad, db_ref),
                                 ("running_mean", module.running_mean, mean_ref),
                                 ("running_var", module.running_var, var_ref)):
        assert_close(actual, wanted, dtype, 64, f"{what}: {name}")


def _ghost_reference(x, dy, gamma, beta, running_mean, running_var, seen, virtual, momentum, eps):
    """Ghost batch norm by the NumPy reference, one chunk at a time, in order."""
    y, dx = np.empty_like(x), np.empty_like(x)
    dgamma, dbeta = np.zeros_like(gamma), np.zeros_like(beta)
    start = 0
    for size in family.ghost_chunk_sizes(x.shape[0], virtual):
        rows = slice(start, start + size)
        y[rows], cache = reference.train_forward(x[rows], gamma, beta, eps)
        dx[rows], dg, db = reference.backward_closed_form(dy[rows], cache)
        dgamma, dbeta = dgamma + dg, dbeta + db
        running_mean, running_var, seen = reference.update_running_stats(
            running_mean, running_var, cache.mean, cache.var, cache.m, momentum, seen)
        start += size
    return y, dx, dgamma, dbeta, running_mean, running_var, seen


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape, virtual, momentum, layout", [
    ((10, 3), 4, 0.1, None),             # chunks 4 + 6
    ((9, 2, 5), 2, None, None),          # 2 + 2 + 2 + 3, cumulative average
    ((5, 3), 2, 0.3, None),              # a remainder of 1 sample joins the last chunk
    ((12, 4, 3, 3), 3, 0.1, None),       # 4 equal chunks: one reshape, no tail
    ((11, 4, 3, 3), 3, 0.1, torch.channels_last),
    ((7, 1, 2, 2, 2), 3, 0.1, None),
])
def test_ghost_matches_reference_chunk_by_chunk(shape, virtual, momentum, layout, dtype):
    gen = torch.Generator().manual_seed(1)
    C = shape[1]
    ours = _ghost_cls(len(shape))(C, momentum=momentum, virtual_batch_size=virtual, dtype=dtype)
    _randomize_affine(ours, gen)
    gamma, beta = ours.weight.detach().double().numpy(), ours.bias.detach().double().numpy()
    running_mean, running_var, seen = np.zeros(C), np.ones(C), 0
    for step in range(2):
        x = torch.randn(shape, generator=gen, dtype=F64) * 3 - 1
        dy = torch.randn(shape, generator=gen, dtype=F64)
        xt = x.to(dtype, copy=True)
        xt = xt.contiguous(memory_format=layout) if layout else xt
        xt.requires_grad_()
        y = ours(xt)
        (y * dy.to(dtype)).sum().backward()
        expected = _ghost_reference(x.numpy(), dy.numpy(), gamma, beta, running_mean,
                                    running_var, seen, virtual, momentum, ours.eps)
        y_ref, dx_ref, dg_ref, db_ref, running_mean, running_var, seen = expected
        what = f"step {step}"
        if layout is not None:
            assert y.is_contiguous(memory_format=layout), f"{what}: layout not kept"
        _assert_step_matches(ours, y, xt.grad,
                             (y_ref, dx_ref, dg_ref, db_ref, running_mean, running_var), dtype,
                             what)
        assert int(ours.num_batches_tracked) == seen
        ours.zero_grad()
    ours.eval()
    x = torch.randn(shape, generator=gen, dtype=F64)
    expected = reference.eval_forward(x.numpy(), running_mean, running_var, gamma, beta, ours.eps)
    assert_close(ours(x.to(dtype)), expected, dtype, 64, "eval output (running statistics)")


def test_ghost_is_vectorized(monkeypatch):
    """64 samples in 16 virtual batches: at most two batch-norm calls (full chunks, tail)."""
    calls = []
    original = ghost_module.ops.batch_norm_train

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(ghost_module.ops, "batch_norm_train", counting)
    ghost = family.GhostBatchNorm2d(3, virtual_batch_size=4)
    ghost(torch.randn(64, 3, 2, 2))
    assert calls == [(4, 48, 2, 2)], calls
    calls.clear()
    ghost(torch.randn(66, 3, 2, 2))  # 15 chunks of 4, then one of 6
    assert calls == [(4, 45, 2, 2), (6, 3, 2, 2)], calls


def test_ghost_small_batches():
    ghost = family.GhostBatchNorm1d(3, virtual_batch_size=4)
    assert ghost(torch.randn(5, 3)).shape == (5, 3)  # remainder 1 joins the chunk: no crash
    assert ghost(torch.randn(1, 3, 4)).shape == (1, 3, 4)  # 1 sample, 4 values per channel
    with pytest.raises(ValueError, match="more than 1 value per channel in every virtual batch"):
        ghost(torch.randn(1, 3))
    single = family.GhostBatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        single(torch.randn(4, 3))
    empty = ghost(torch.randn(0, 3))
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        family.GhostBatchNorm2d(3, virtual_batch_size=0)


def test_ghost_without_running_stats_normalizes_by_chunk_in_eval():
    ghost = family.GhostBatchNorm1d(2, virtual_batch_size=3, track_running_stats=False).eval()
    x = torch.randn(6, 2, dtype=F64)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True)
                          for c in x.split(3)])
    ghost.double()
    assert_close(ghost(x), expected, F64, 64, "eval without running statistics")


# ---------------------------------------------------------------------------------------------
# Batch renormalization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step, expected", [
    (0, (1.0, 0.0)), (4999, (1.0, 0.0)), (5000, (1.0, 0.0)),
    (15000, (1 + 2 * 10 / 35, 5 * 10 / 20)), (22500, (2.0, 5 * 17.5 / 20)),
    (25000, (1 + 2 * 20 / 35, 5.0)), (40000, (3.0, 5.0)), (10**6, (3.0, 5.0)),
])
def test_renorm_schedule(step, expected):
    r_max, d_max = family.renorm_limits(step, 3.0, 5.0, 5000, 40000, 25000)
    assert float(r_max) == pytest.approx(expected[0]) and float(d_max) == pytest.approx(expected[1])


def test_renorm_schedule_without_warmup_and_ramp():
    assert [float(v) for v in family.renorm_limits(0, 3.0, 5.0, 0, 0, 0)] == [3.0, 5.0]
    step = torch.tensor(7)  # a buffer, as num_batches_tracked
    assert [float(v) for v in family.renorm_limits(step, 2.0, 1.0, 10, 10, 10)] == [1.0, 0.0]


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4), (5, 3, 3, 3)])
def test_renorm_with_unit_limits_is_batchnorm(shape):
    gen = torch.Generator().manual_seed(2)
    ours = _renorm_cls(len(shape))(shape[1], dtype=F64, r_max=1.0, d_max=0.0, warmup_steps=0,
                                   r_max_steps=0, d_max_steps=0)
    theirs = _torch_bn(len(shape), shape[1])
    _randomize_affine(ours, gen)
    with torch.no_grad():  # running statistics far from the batch's: r, d would be active
        ours.running_mean.fill_(4.0)
        ours.running_var.fill_(25.0)
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        _train_step_matches(ours, theirs, shape, step, f"step {step}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name), getattr(theirs, name), F64, 64, name)


def test_renorm_warmup_is_batchnorm():
    """Default schedule: the first 5000 steps are plain batch norm, whatever the limits."""
    ours, theirs = family.BatchRenorm2d(3, dtype=F64), _torch_bn(4, 3)
    with torch.no_grad():
        ours.running_var.fill_(9.0)
    theirs.load_state_dict(ours.state_dict())
    _train_step_matches(ours, theirs, (4, 3, 2, 2), 3, "warm-up step")
    ours.num_batches_tracked.fill_(40000)  # past the ramps: r_max = 3, d_max = 5
    assert [float(v) for v in ours.current_limits()] == [3.0, 5.0]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape, r_max, d_max", [
    ((8, 3), 1.5, 0.5),           # clipping active (running statistics far off)
    ((6, 4, 5), 2.0, 1.0),
    ((4, 3, 3, 3), 100.0, 100.0),  # no clipping
])
def test_renorm_matches_reference(shape, r_max, d_max, dtype):
    gen = torch.Generator().manual_seed(4)
    C = shape[1]
    module = _renorm_cls(len(shape))(C, dtype=dtype, r_max=r_max, d_max=d_max, warmup_steps=0,
                                     r_max_steps=0, d_max_steps=0, momentum=0.2)
    _randomize_affine(module, gen)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(C, generator=gen) * 2)
        module.running_var.copy_(torch.rand(C, generator=gen) * 8 + 0.1)
    for step in range(2):
        x = torch.randn(shape, generator=gen, dtype=F64) * 1.5 + 0.5
        dy = torch.randn(shape, generator=gen, dtype=F64)
        state = {k: v.double().numpy().copy() for k, v in module.state_dict().items()}
        y_ref, cache = reference.renorm_train_forward(
            x.numpy(), state["running_mean"], state["running_var"], state["weight"],
            state["bias"], r_max, d_max, module.eps)
        dx_ref, dg_ref, db_ref = reference.renorm_backward(dy.numpy(), cache)
        mean_ref, var_ref, seen = reference.update_running_stats(
            state["running_mean"], state["running_var"], cache.bn.mean, cache.bn.var, cache.bn.m,
            0.2, int(state["num_batches_tracked"]))
        xt = x.to(dtype, copy=True).requires_grad_()
        y = module(xt)
        (y * dy.to(dtype)).sum().backward()
        what = f"step {step}"
        _assert_step_matches(module, y, xt.grad,
                             (y_ref, dx_ref, dg_ref, db_ref, mean_ref, var_ref), dtype, what)
        assert int(module.num_batches_tracked) == seen
        module.zero_grad()
        if r_max == 100.0:  # unclipped: the forward normalizes by the running statistics
            expected = reference.eval_forward(x.numpy(), state["running_mean"],
                                              state["running_var"], state["weight"],
                                              state["bias"], module.eps)
            assert_close(y, expected, dtype, 64, f"{what}: unclipped output = eval output")
    module.eval()
    x = torch.randn(shape, generator=gen, dtype=F64)
    state = {k: v.double().numpy() for k, v in module.state_dict().items()}
    expected = reference.eval_forward(x.numpy(), state["running_mean"], state["running_var"],
                                      state["weight"], state["bias"], module.eps)
    assert_close(module(x.to(dtype)), expected, dtype, 64, "eval output")


def test_renorm_has_no_gradient_through_r_and_d():
    """Against autograd of the formula with r and d detached; differs when they are not."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 3, 4, generator=gen, dtype=F64) * 2).requires_grad_()
    gamma = (torch.rand(3, generator=gen, dtype=F64) + 0.5).requires_grad_()
    beta = torch.randn(3, generator=gen, dtype=F64).requires_grad_()
    running_mean, running_var = torch.full((3,), 0.7, dtype=F64), torch.full((3,), 2.5, dtype=F64)
    dy = torch.randn(7, 3, 4, generator=gen, dtype=F64)

    def formula(detach):
        mu = x.mean((0, 2), keepdim=True)
        sigma_b = (x.var((0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
        sigma = (running_var.view(1, 3, 1) + 1e-5).sqrt()
        r = (sigma_b / sigma).clamp(1 / 4.0, 4.0)
        d = ((mu - running_mean.view(1, 3, 1)) / sigma).clamp(-3.0, 3.0)
        if detach:
            r, d = r.detach(), d.detach()
        y = gamma.view(1, 3, 1) * ((x - mu) / sigma_b * r + d) + beta.view(1, 3, 1)
        return torch.autograd.grad((y * dy).sum(), (x, gamma, beta))

    y = family.batch_renorm(x, running_mean.clone(), running_var.clone(), gamma, beta, True, 0.1,
                            1e-5, 4.0, 3.0)
    ours = torch.autograd.grad((y * dy).sum(), (x, gamma, beta))
    for mine, expected, name in zip(ours, formula(detach=True), ("x", "gamma", "beta"),
                                    strict=True):
        assert_close(mine, expected, F64, 64, f"grad {name}")
    assert not torch.allclose(ours[0], formula(detach=False)[0]), "r, d gradient would show"


def test_renorm_with_frozen_buffers_still_renormalizes():
    module = family.BatchRenorm1d(3, r_max=2.0, d_max=1.0, warmup_steps=0, r_max_steps=0,
                                  d_max_steps=0, dtype=F64)
    with torch.no_grad():
        module.running_mean.fill_(3.0)
    module.track_running_stats = False  # after construction: buffers frozen, as torch
    x = torch.randn(8, 3, dtype=F64)
    expected = family.batch_renorm(x, torch.full((3,), 3.0, dtype=F64), torch.ones(3, dtype=F64),
                                   module.weight, module.bias, True, 0.1, 1e-5, 2.0, 1.0)
    assert_close(module(x), expected, F64, 64, "frozen buffers")
    assert float(module.running_mean[0]) == 3.0 and int(module.num_batches_tracked) == 0


def test_renorm_rejects():
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        family.BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max >= 1 and d_max >= 0"):
        family.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        family.BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        family.batch_renorm(torch.randn(4, 3), None, None, None, None, True, 0.1, 1e-5, 2, 1)


# ---------------------------------------------------------------------------------------------
# Frozen batch norm
# ---------------------------------------------------------------------------------------------


def _trained_bn(cls, channels, gen, **kw):
    bn = cls(channels, dtype=F64, **kw)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(channels, generator=gen, dtype=F64) * 3 + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.randn(channels, generator=gen, dtype=F64))
            bn.bias.copy_(torch.randn(channels, generator=gen, dtype=F64))
    return bn


@pytest.mark.parametrize("cls, shape", [
    (torch.nn.BatchNorm1d, (5, 3)), (torch.nn.BatchNorm2d, (4, 3, 5, 5)),
    (torch.nn.BatchNorm3d, (2, 3, 2, 3, 3)), (torch.nn.SyncBatchNorm, (4, 3, 6)),
])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_equals_eval_batchnorm(cls, shape, affine):
    gen = torch.Generator().manual_seed(6)
    bn = _trained_bn(cls, 3, gen, affine=affine).eval()
    frozen = family.freeze_batchnorm(copy.deepcopy(bn))
    assert isinstance(frozen, family.FrozenBatchNorm) and frozen.training
    x = torch.randn(shape, generator=gen, dtype=F64)
    check_forward_backward(frozen, bn, {"input": x}, F64, reduction_size=64)
    assert list(frozen.parameters()) == []


def test_frozen_state_dict_is_torchvisions():
    frozen = family.FrozenBatchNorm2d(4)
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(frozen.parameters()) == [] and frozen.eps == 1e-5
    gen = torch.Generator().manual_seed(7)
    bn = _trained_bn(torch.nn.BatchNorm2d, 4, gen).float()
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is dropped
    bn.eval()
    x = torch.randn(2, 4, 3, 3)
    assert_close(frozen(x), bn(x), torch.float32, 64, "loaded from a BatchNorm2d state_dict")
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05)"
    with pytest.raises(ValueError, match=r"expects 4D input with 4 channels"):
        frozen(torch.randn(2, 4, 3))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed")
def test_frozen_round_trips_with_torchvision():
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    gen = torch.Generator().manual_seed(8)
    theirs = TorchvisionFrozen(3)
    for name in ("weight", "bias", "running_mean"):
        getattr(theirs, name).copy_(torch.randn(3, generator=gen))
    theirs.running_var.copy_(torch.rand(3, generator=gen) + 0.5)
    ours = family.FrozenBatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 4, 4, generator=gen)
    assert_close(ours(x), theirs(x), torch.float32, 64, "torchvision's FrozenBatchNorm2d")


def test_freeze_batchnorm_freezes_every_layer():
    gen = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, dtype=F64),
        _trained_bn(torch.nn.BatchNorm2d, 4, gen),
        torch.nn.Sequential(_trained_bn(batchnorm.BatchNormReLU2d, 4, gen)),
        _trained_bn(family.GhostBatchNorm2d, 4, gen, virtual_batch_size=2),
        _trained_bn(family.BatchRenorm2d, 4, gen),
        _trained_bn(SyncBatchNorm, 4, gen),
        torch.nn.Flatten(2),
        _trained_bn(batchnorm.BatchNorm1d, 4, gen),
    )
    x = torch.randn(3, 3, 5, 5, generator=gen, dtype=F64)
    expected = model.eval()(x)
    frozen = family.freeze_batchnorm(model.train())
    assert frozen is model
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, family.FrozenBatchNorm)]
    assert kinds == ["FrozenBatchNorm2d"] * 4 + ["FrozenBatchNorm", "FrozenBatchNorm1d"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model[2][0].relu
    assert_close(model(x), expected, F64, 64, "frozen model in train mode = model in eval mode")
    with pytest.raises(ValueError, match="no running statistics"):
        family.freeze_batchnorm(torch.nn.BatchNorm2d(3, track_running_stats=False))


def test_frozen_add_relu():
    gen = torch.Generator().manual_seed(10)
    fused = _trained_bn(batchnorm.BatchNormAddReLU2d, 3, gen).eval()
    frozen = family.freeze_batchnorm(copy.deepcopy(fused))
    x, residual = torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(2, 3, 4, 4, dtype=F64)
    assert_close(frozen(x, residual), fused(x, residual), F64, 64, "BN + add + ReLU")


def test_reference_renorm_with_unit_limits_is_algorithm_1():
    rng = np.random.default_rng(11)
    x, dy = rng.normal(2.0, 3.0, size=(6, 3, 4)), rng.normal(size=(6, 3, 4))
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    y, cache = reference.renorm_train_forward(x, np.full(3, 5.0), np.full(3, 0.1), gamma, beta,
                                              r_max=1.0, d_max=0.0)
    y_bn, cache_bn = reference.train_forward(x, gamma, beta)
    np.testing.assert_allclose(y, y_bn, rtol=1e-12, atol=1e-12)
    for mine, expected in zip(reference.renorm_backward(dy, cache),
                              reference.backward_stages(dy, cache_bn), strict=True):
        np.testing.assert_allclose(mine, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="r_max >= 1 and d_max >= 0"):
        reference.renorm_train_forward(x, np.zeros(3), np.ones(3), d_max=-1.0)
