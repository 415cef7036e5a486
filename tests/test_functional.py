"""functional.batch_norm: torch's semantics, bad input, state kept, numerics, gradients."""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm import kernels
from batchnorm.functional import batch_norm
from tests.utils import check_forward_backward, make_inputs


def test_signature_extends_torch():
    ours = inspect.signature(batch_norm).parameters
    theirs = inspect.signature(TF.batch_norm).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in list(ours)[len(theirs):])


# eval without running statistics is an error: tested below
@pytest.mark.parametrize("training,with_stats", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_functional(training, with_stats, affine):
    inputs = make_inputs((6, 4, 5), torch.float64)
    running = [inputs.mean, 1 / inputs.invstd**2] if with_stats else [None, None]
    ours_stats, theirs_stats = ([None if t is None else t.clone() for t in running]
                                for _ in range(2))
    leaves = {"input": inputs.x}
    if affine:
        leaves.update(weight=inputs.weight, bias=inputs.bias)

    def call(fn, stats):
        return lambda x, *affine: fn(x, *stats, *affine, training=training, momentum=0.3,
                                     eps=1e-3)

    check_forward_backward(call(batch_norm, ours_stats), call(TF.batch_norm, theirs_stats),
                           leaves, torch.float64, reduction_size=30)
    if with_stats:
        torch.testing.assert_close(ours_stats, theirs_stats, rtol=0, atol=1e-12)
        updated = not torch.equal(ours_stats[0], running[0])
        assert updated == training, f"running_mean updated: {updated}, training: {training}"


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception type, a message naming the problem, and no state lost
# ---------------------------------------------------------------------------------------------


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    after = module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a call that raised"


BAD_MODULE_CALLS = [
    # (module factory, input, exception, words the message must contain)
    (lambda: batchnorm.BatchNorm2d(3), torch.randn(8, 3, 32), ValueError,
     ["BatchNorm2d", "4D", "(N, C, H, W)", "3D", "(8, 3, 32)"]),
    (lambda: batchnorm.BatchNorm1d(3), torch.randn(2, 3, 4, 4), ValueError, ["2D or 3D", "4D"]),
    (lambda: batchnorm.BatchNorm3d(3), torch.randn(2, 3, 4), ValueError, ["5D"]),
    (lambda: batchnorm.BatchNorm2d(4), torch.randn(8, 3, 5, 5), RuntimeError,
     ["4 channels", "3 channels", "(8, 3, 5, 5)"]),
    (lambda: batchnorm.BatchNorm1d(3), torch.randn(1, 3), ValueError,
     ["more than 1 value per channel"]),
    (lambda: batchnorm.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError,
     ["more than 1 value per channel"]),
    (lambda: batchnorm.BatchNorm1d(3), torch.ones(4, 3, dtype=torch.long), NotImplementedError,
     ["floating-point", "torch.int64"]),
]


@pytest.mark.parametrize("factory,x,exc,words", BAD_MODULE_CALLS)
def test_bad_input_raises_and_keeps_state(factory, x, exc, words):
    m = factory()
    m(torch.randn((4, m.num_features) + (3,) * (m._ranks[0] - 2)))  # some state to lose
    before = _snapshot(m)
    with pytest.raises(exc) as info:
        m(x)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    _assert_unchanged(m, before)


def test_bad_buffer_and_parameter_sizes():
    x = torch.randn(4, 3, 5)
    for kwargs, name in [({"running_mean": torch.zeros(4)}, "running_mean"),
                         ({"running_var": torch.ones(2)}, "running_var"),
                         ({"weight": torch.ones(4)}, "weight"),
                         ({"bias": torch.ones(2)}, "bias")]:
        args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), **kwargs}
        given = dict(args)
        before = {k: v.clone() for k, v in args.items()}
        with pytest.raises(RuntimeError, match=name) as info:
            batch_norm(x, args.pop("running_mean"), args.pop("running_var"), training=True, **args)
        assert "3" in str(info.value)
        m = batchnorm.BatchNorm1d(3)
        snapshot = _snapshot(m)
        for k, v in kwargs.items():
            if k.startswith("running"):
                setattr(m, k, v.clone())
                snapshot[k] = v.clone()
            else:
                setattr(m, k, torch.nn.Parameter(v.clone()))
                snapshot[k] = v.clone()
        with pytest.raises(RuntimeError, match=name):
            m(x)
        _assert_unchanged(m, snapshot)
        assert all(torch.equal(given[k], before[k]) for k in before)  # the call left them


@pytest.mark.parametrize("kwargs", [
    {"num_features": 0}, {"num_features": -3}, {"num_features": 3, "eps": 0.0},
    {"num_features": 3, "eps": -1e-5}, {"num_features": 3, "momentum": 1.5},
    {"num_features": 3, "momentum": -1.2}, {"num_features": 3, "momentum": None},
])
def test_constructor_accepts_what_torch_accepts(kwargs):
    # Drop-in: the same construction succeeds, or fails with the same exception type.
    def outcome(cls):
        try:
            cls(**kwargs)
        except Exception as error:  # noqa: BLE001  compared below
            return type(error)
        return None
    assert outcome(batchnorm.BatchNorm2d) is outcome(torch.nn.BatchNorm2d)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [0.0, -1e-5, 1e-5])
def test_eps_is_checked_where_torch_checks_it(training, eps):
    x = torch.randn(5, 3)
    def run(fn):
        try:
            return fn(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)
        except Exception as error:  # noqa: BLE001  compared below
            return type(error)
    ours, theirs = run(batch_norm), run(torch.nn.functional.batch_norm)
    if isinstance(theirs, type):
        assert ours is theirs
    else:
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("momentum", [-1.2, -1.0, 1.5, 3.0])
def test_any_float_momentum_as_torch(momentum):
    x = torch.randn(6, 3, 4)
    ours, theirs = (torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))
    batch_norm(x, *ours, training=True, momentum=momentum)
    torch.nn.functional.batch_norm(x, *theirs, training=True, momentum=momentum)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 3, 4), (0, 3, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_inputs_as_torch(shape, training):
    x = torch.randn(shape)
    stats = (None, None) if training else (torch.zeros(3), torch.ones(3))
    ours = batch_norm(x, *stats, training=training)
    theirs = torch.nn.functional.batch_norm(x, *stats, training=training)
    torch.testing.assert_close(ours, theirs)  # shape, dtype and device: there are no values


@pytest.mark.parametrize("training", [True, False])
def test_per_channel_tensors_of_any_shape_are_taken_as_torch_takes_them(training):
    # torch reads C values of any shape ((1, C), (C, 1)); so does every route here
    x = torch.randn(4, 3, 5)
    weight, bias = torch.rand(1, 3) + 0.5, torch.randn(3, 1)
    expected = TF.batch_norm(x, torch.zeros(3), torch.ones(3), weight, bias, training)
    for backend in (None, "aten", "composite"):
        with kernels.use(backend):
            got = batch_norm(x, torch.zeros(3), torch.ones(3), weight, bias, training)
        torch.testing.assert_close(got, expected, msg=str(backend))


def test_tensors_on_another_device_are_rejected():
    x = torch.randn(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="running_mean is on cpu, expected meta"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False)
    with pytest.raises(RuntimeError, match="weight is on meta, expected cpu"):
        batch_norm(torch.randn(4, 3), None, None, torch.ones(3, device="meta"), training=True)


def test_attributes_changed_after_construction_are_checked_before_any_update():
    m = batchnorm.BatchNorm1d(3)
    m(torch.randn(5, 3))
    before = _snapshot(m)
    m.eps = 0.0
    with pytest.raises(ValueError, match="eps"):
        m(torch.randn(5, 3))
    _assert_unchanged(m, before)
    m.eps = -1.0
    m.eval()
    with pytest.raises(ValueError, match="eps"):
        m(torch.randn(5, 3))
    _assert_unchanged(m, before)


def test_eval_without_running_statistics_is_an_error():
    with pytest.raises(RuntimeError, match="running_mean and running_var"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


def test_non_finite_batch_leaves_running_stats_untouched_and_warns():
    m = batchnorm.BatchNorm1d(3)
    m(torch.randn(8, 3))
    before = _snapshot(m)
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        m(bad)
    _assert_unchanged(m, before)  # num_batches_tracked too: the batch is not counted
    bad[2, 1] = float("inf")
    with pytest.warns(RuntimeWarning):
        m(bad)
    _assert_unchanged(m, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(8, 3))  # a finite batch updates as usual, without warning
    assert m.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_offset_is_stable_in_float32(layout):
    torch.manual_seed(0)
    x64 = torch.randn(16, 4, 12, 12, dtype=torch.float64) + 1e4
    x32 = x64.float()
    if layout == "channels_last":
        x32 = x32.contiguous(memory_format=torch.channels_last)
    y = batch_norm(x32, None, None, training=True)
    y_ref = TF.batch_norm(x32.double(), None, None, training=True)
    assert (y.double() - y_ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    # 2^16 values of 1.0 per channel: a float16 accumulator would overflow/saturate.
    x = (torch.randn(64, 2, 32, 32) * 2 + 30).to(dtype)
    rm, rv = torch.zeros(2), torch.ones(2)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0)
    x64 = x.double()
    torch.testing.assert_close(rm.double(), x64.mean((0, 2, 3)), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(rv.double(), x64.var((0, 2, 3)), atol=1e-3, rtol=1e-3)
    assert torch.isfinite(y).all() and y.dtype == dtype


def test_gradcheck_and_gradgradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    cases = {
        "train": (lambda x, w, b: batch_norm(x, None, None, w, b, training=True), (x, w, b)),
        "train no affine": (lambda x: batch_norm(x, None, None, training=True), (x,)),
        "train relu+residual": (lambda x, w, b, r: batch_norm(
            x, None, None, w, b, training=True, residual=r, relu=True), (x, w, b, r)),
        "eval": (lambda x, w, b: batch_norm(x, rm, rv, w, b, training=False), (x, w, b)),
        "eval relu": (lambda x, w: batch_norm(x, rm, rv, w, None, relu=True), (x, w)),
    }
    for name, (fn, inputs) in cases.items():
        assert gradcheck(fn, inputs), name
        assert gradgradcheck(fn, inputs), name


def test_channels_last_double_backward():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda x, w: batch_norm(x, None, None, w, None, training=True), (x, w))


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(2, 6), st.integers(1, 4), st.integers(1, 5))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, shift=st.floats(-1e3, 1e3), scale=st.floats(1e-2, 1e2),
       seed=st.integers(0, 2**16))
def test_shift_and_scale_invariance(shape, shift, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    y = batch_norm(x, None, None, training=True, eps=eps)
    # eps scales with the variance (eps * scale^2): then the invariance is exact, whatever the
    # spread of x (with eps fixed, a tiny variance would show eps's effect, not a bug)
    y2 = batch_norm(x * scale + shift, None, None, training=True, eps=eps * scale**2)
    torch.testing.assert_close(y, y2, atol=1e-7, rtol=1e-7)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_per_channel_moments(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4 + 2
    eps = 1e-5
    y = batch_norm(x, None, None, training=True, eps=eps)
    dims = (0, 2)
    var = x.var(dims, unbiased=False)
    torch.testing.assert_close(y.mean(dims), torch.zeros(shape[1], dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # unit variance up to the eps effect: var(y) = var / (var + eps)
    torch.testing.assert_close(y.var(dims, unbiased=False), var / (var + eps), atol=1e-9, rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_identity_recovery(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1
    eps = 1e-5
    dims = (0, 2)
    gamma = torch.sqrt(x.var(dims, unbiased=False) + eps)
    beta = x.mean(dims)
    y = batch_norm(x, None, None, gamma, beta, training=True, eps=eps)
    torch.testing.assert_close(y, x, atol=1e-9, rtol=1e-9)


def test_running_stats_changed_after_an_eval_forward_are_caught_by_autograd():
    """The CPU update writes through NumPy and bumps the version counter by hand, so a backward
    through an eval graph whose running statistics changed since raises instead of silently
    using the new values (torch 2.13's CPU kernel updates them unseen: its backward goes on)."""
    module = batchnorm.BatchNorm1d(3)
    x = torch.randn(8, 3, requires_grad=True)
    y = module.eval()(x)  # the eval graph keeps running_mean / running_var
    module.train()(torch.randn(8, 3))  # updates them in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_extremes_train_without_false_alarms(layout, scale):
    # Finite float32 data whose squares leave float32: normalized correctly, and the NaN/Inf
    # guard does not fire (the input holds no NaN or Inf).
    import warnings

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * scale + 3 * scale
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    m = batchnorm.BatchNorm2d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(x)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 if scale > 1 else 1e-30)
    assert int(m.num_batches_tracked) == 1
    torch.testing.assert_close(m.running_mean.double(), 0.1 * x.double().mean((0, 2, 3)),
                               rtol=1e-5, atol=0)


def test_float16_near_its_maximum():
    x = (torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 65000
    y = batchnorm.BatchNorm2d(3, dtype=torch.float16)(x.half())
    ref = torch.nn.functional.batch_norm(x.half().double(), None, None, training=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", [None, "aten", "composite"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_buffer_without_the_other_is_refused_as_torch(backend, training, given):
    # torch: ValueError in training (both or neither), RuntimeError in eval (both needed)
    x = torch.randn(4, 3)
    buffers = {"running_mean": None, "running_var": None, given: torch.ones(3)}
    with pytest.raises(ValueError if training else RuntimeError):
        torch.nn.functional.batch_norm(x, training=training, **buffers)
    with kernels.use(backend), pytest.raises(ValueError if training else RuntimeError) as info:
        batch_norm(x, training=training, **buffers)
    assert given in str(info.value) and torch.equal(buffers[given], torch.ones(3))
