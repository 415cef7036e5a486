"""batchnorm.reference, the NumPy specification, against itself, finite differences and torch.

Every layout the reference accepts is checked four ways for the gradients (stage by stage, closed
form, central differences, torch autograd of F.batch_norm in float64), and against this
package's own functional.batch_norm and modules, so that the specification and the
implementation cannot drift apart silently.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import batchnorm
from batchnorm import reference as R
from tests.utils import tolerance

# Tolerances: tests.utils' table keyed by dtype (the reference runs in float64), and central
# differences with h = 1e-6, which carry O(h^2) truncation and O(1e-16 / h) rounding error:
# about 1e-9 per entry.
TOL = tolerance(torch.float64)
FD_TOL = dict(rtol=1e-5, atol=1e-6)


# (shape, channel axis): every rank, channels-last, and the odd sizes (1 channel, batch 2, primes,
# spatial 1x1, one value per channel along a spatial axis).
LAYOUTS = [
    ((2, 1), 1),             # (N, C): batch 2, one channel
    ((5, 3), 1),
    ((2, 3, 7), 1),          # (N, C, L)
    ((3, 1, 5), 1),
    ((2, 3, 1, 1), 1),       # (N, C, H, W), spatial 1x1, batch 2
    ((2, 3, 5, 7), 1),
    ((3, 2, 1, 5), 1),
    ((2, 2, 3, 1, 2), 1),    # (N, C, D, H, W)
    ((3, 5, 2, 4), -1),      # channels-last (N, H, W, C)
    ((2, 1, 1, 3), -1),      # channels-last, 3 channels, m = 2
    ((2, 3, 1, 2, 5), -1),   # channels-last 3D (N, D, H, W, C)
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in LAYOUTS]


def _case(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = rng.normal(1.5, 2.0, size=shape)
    gamma = rng.uniform(0.5, 2.0, size=channels) * rng.choice([-1.0, 1.0], size=channels)
    beta = rng.normal(size=channels)
    dy = rng.normal(size=shape)
    return x, gamma, beta, dy


def _channels_first(x, axis):
    """The array moved to torch's (N, C, *) layout, as a float64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1)))


def _from_channels_first(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


def _autograd(batch_norm_fn, x, gamma, beta, dy, axis, eps):
    """Output and (dx, dgamma, dbeta) of a torch-signature batch_norm in training mode."""
    xt = _channels_first(x, axis).requires_grad_()
    gt = torch.from_numpy(gamma).requires_grad_()
    bt = torch.from_numpy(beta).requires_grad_()
    y = batch_norm_fn(xt, None, None, gt, bt, True, 0.1, eps)
    y.backward(_channels_first(dy, axis))
    return (_from_channels_first(y, axis),
            (_from_channels_first(xt.grad, axis), gt.grad.numpy(), bt.grad.numpy()))


def _assert_close(actual, expected, tol=TOL, what=""):
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


# ----------------------------------------------------------------------------------------------
# Algorithm 1 and its gradients


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_gradients_four_ways(shape, axis):
    """Stage by stage == closed form == central differences == torch autograd (float64)."""
    eps = 1e-5
    x, gamma, beta, dy = _case(shape, axis)
    y, cache = R.train_forward(x, gamma, beta, eps, axis=axis)
    stages = R.backward_stages(dy, cache)
    closed = R.backward_closed_form(dy, cache)

    def loss(x_=x, gamma_=gamma, beta_=beta):  # <dy, y>: its gradient is the backward of dy
        return float((R.train_forward(x_, gamma_, beta_, eps, axis=axis)[0] * dy).sum())

    central = (R.numerical_gradient(lambda v: loss(x_=v), x),
               R.numerical_gradient(lambda v: loss(gamma_=v), gamma),
               R.numerical_gradient(lambda v: loss(beta_=v), beta))
    y_torch, torch_grads = _autograd(F.batch_norm, x, gamma, beta, dy, axis, eps)

    _assert_close(y, y_torch, what="forward vs torch")
    for name, s, c, n, t in zip(("dx", "dgamma", "dbeta"), stages, closed, central, torch_grads,
                                strict=True):
        assert s.shape == c.shape == n.shape == t.shape
        _assert_close(s, c, what=f"{name}: stages vs closed form")
        _assert_close(s, t, what=f"{name}: stages vs torch")
        _assert_close(s, n, FD_TOL, what=f"{name}: stages vs central differences")


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_matches_our_functional(shape, axis):
    """batchnorm.functional.batch_norm (ours, on the custom ops) reproduces the specification."""
    eps = 1e-3
    x, gamma, beta, dy = _case(shape, axis, seed=1)
    y, cache = R.train_forward(x, gamma, beta, eps, axis=axis)
    ours_y, ours_grads = _autograd(batchnorm.functional.batch_norm, x, gamma, beta, dy, axis, eps)
    _assert_close(ours_y, y, what="forward")
    for name, ours, ref in zip(("dx", "dgamma", "dbeta"), ours_grads,
                               R.backward_closed_form(dy, cache), strict=True):
        _assert_close(ours, ref, what=name)


def test_no_affine_means_gamma_one_beta_zero():
    x, _, _, dy = _case((4, 3, 5), 1)
    y_none, cache_none = R.train_forward(x)
    y_ones, cache_ones = R.train_forward(x, np.ones(3), np.zeros(3))
    _assert_close(y_none, y_ones)
    for a, b in zip(R.backward_stages(dy, cache_none), R.backward_stages(dy, cache_ones),
                    strict=True):
        _assert_close(a, b)


def test_cache_holds_batch_mean_and_biased_variance():
    x, gamma, beta, _ = _case((6, 3, 4), 1)
    _, cache = R.train_forward(x, gamma, beta)
    _assert_close(cache.mean, x.mean(axis=(0, 2)))
    _assert_close(cache.var, x.var(axis=(0, 2), ddof=0))
    assert cache.m == 24


def test_float32_input_is_computed_in_float64():
    x, gamma, beta, _ = _case((4, 3), 1)
    y, _ = R.train_forward(x.astype(np.float32), gamma, beta)
    assert y.dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_runs_every_stage_in_that_dtype(dtype):
    x, gamma, beta, dy = _case((6, 3, 5), 1)
    y, cache = R.train_forward(x, gamma, beta, dtype=dtype)
    y64, cache64 = R.train_forward(x, gamma, beta)
    dx, dgamma, dbeta = R.backward_closed_form(dy, cache)
    assert y.dtype == cache.x_hat.dtype == dx.dtype == dgamma.dtype == np.dtype(dtype)
    assert R.eval_forward(x, cache.mean, cache.var, gamma, beta, dtype=dtype).dtype == dtype
    tol = tolerance(torch.float32 if dtype == np.float32 else torch.float64, cache.m)
    _assert_close(y, y64, tol)
    _assert_close(dx, R.backward_closed_form(dy, cache64)[0], tol)


# ----------------------------------------------------------------------------------------------
# Algorithm 2 and the running statistics


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_eval_forward_matches_torch_and_ours(shape, axis):
    eps = 1e-5
    x, gamma, beta, _ = _case(shape, axis, seed=2)
    rng = np.random.default_rng(3)
    channels = shape[axis]
    running_mean, running_var = rng.normal(size=channels), rng.uniform(0.1, 3.0, size=channels)
    y = R.eval_forward(x, running_mean, running_var, gamma, beta, eps, axis=axis)
    args = (_channels_first(x, axis), torch.from_numpy(running_mean),
            torch.from_numpy(running_var), torch.from_numpy(gamma), torch.from_numpy(beta),
            False, 0.1, eps)
    _assert_close(y, _from_channels_first(F.batch_norm(*args), axis), what="vs torch")
    _assert_close(y, _from_channels_first(batchnorm.functional.batch_norm(*args), axis),
                  what="vs ours")


def test_eval_with_the_batch_statistics_equals_train_forward():
    """Algorithm 2 with E[x], Var[x] set to this batch's (biased) statistics is Algorithm 1."""
    x, gamma, beta, _ = _case((5, 3, 4), 1)
    y_train, cache = R.train_forward(x, gamma, beta)
    _assert_close(R.eval_forward(x, cache.mean, cache.var, gamma, beta), y_train)


TORCH_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                 5: torch.nn.BatchNorm3d}


@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["0.1", "0.7", "None"])
@pytest.mark.parametrize("shape, axis", [((2, 3), 1), ((2, 3, 5), 1), ((3, 2, 1, 1), 1),
                                         ((2, 3, 2, 3, 2), 1), ((3, 4, 2, 5), -1)])
def test_running_stats_three_steps_vs_torch_nn(shape, axis, momentum):
    channels = shape[axis]
    ref_mean, ref_var, ref_count = np.zeros(channels), np.ones(channels), 0
    module = TORCH_MODULES[len(shape)](channels, momentum=momentum).double().train()
    for step in range(3):
        x, gamma, beta, _ = _case(shape, axis, seed=10 + step)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gamma))
            module.bias.copy_(torch.from_numpy(beta))
            y_torch = module(_channels_first(x, axis))
        y, cache = R.train_forward(x, gamma, beta, module.eps, axis=axis)
        ref_mean, ref_var, ref_count = R.update_running_stats(
            ref_mean, ref_var, cache.mean, cache.var, cache.m, momentum, ref_count)
        _assert_close(y, _from_channels_first(y_torch, axis), what=f"output, step {step}")
        _assert_close(ref_mean, module.running_mean.numpy(), what=f"running_mean, step {step}")
        _assert_close(ref_var, module.running_var.numpy(), what=f"running_var, step {step}")
        assert ref_count == int(module.num_batches_tracked) == step + 1


@pytest.mark.parametrize("momentum", [0.1, None], ids=["0.1", "None"])
def test_running_stats_three_steps_vs_our_batchnorm2d(momentum):
    channels = 3
    ref_mean, ref_var, ref_count = np.zeros(channels), np.ones(channels), 0
    module = batchnorm.BatchNorm2d(channels, momentum=momentum).double().train()
    for step in range(3):
        x, _, _, _ = _case((2, channels, 3, 5), 1, seed=20 + step)
        with torch.no_grad():
            y_ours = module(torch.from_numpy(x))
        y, cache = R.train_forward(x, module.weight.detach().numpy(),
                                   module.bias.detach().numpy(), module.eps)
        ref_mean, ref_var, ref_count = R.update_running_stats(
            ref_mean, ref_var, cache.mean, cache.var, cache.m, momentum, ref_count)
        _assert_close(y, y_ours.numpy(), what=f"output, step {step}")
        _assert_close(ref_mean, module.running_mean.numpy(), what=f"running_mean, step {step}")
        _assert_close(ref_var, module.running_var.numpy(), what=f"running_var, step {step}")
        assert ref_count == int(module.num_batches_tracked)
    module.eval()
    x, _, _, _ = _case((2, channels, 3, 5), 1, seed=30)
    with torch.no_grad():
        y_eval = module(torch.from_numpy(x)).numpy()
    _assert_close(y_eval, R.eval_forward(x, ref_mean, ref_var, module.weight.detach().numpy(),
                                         module.bias.detach().numpy(), module.eps))


def test_update_running_stats_is_pure():
    running_mean, running_var = np.zeros(2), np.ones(2)
    new_mean, new_var, count = R.update_running_stats(running_mean, running_var,
                                                      np.array([1.0, 2.0]), np.array([4.0, 4.0]),
                                                      m=5, momentum=0.5, num_batches_tracked=7)
    np.testing.assert_array_equal(running_mean, [0.0, 0.0])
    np.testing.assert_array_equal(running_var, [1.0, 1.0])
    _assert_close(new_mean, [0.5, 1.0])
    _assert_close(new_var, [0.5 + 0.5 * 4.0 * 5 / 4] * 2)  # the unbiased variance, m/(m-1)
    assert count == 8


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: R.train_forward(np.zeros(4)), "at least 2 dimensions"),
        (lambda: R.train_forward(np.ones((1, 3))), "more than 1 value per channel"),
        (lambda: R.train_forward(np.ones((1, 3, 1, 1))), "more than 1 value per channel"),
        (lambda: R.train_forward(np.ones((4, 3)), np.ones(2)),
         r"gamma .* \(3,\), got shape \(2,\)"),
        (lambda: R.train_forward(np.ones((4, 3)), None, np.ones((3, 1))), "beta"),
        (lambda: R.train_forward(np.ones((4, 3)), eps=0.0), "eps must be positive"),
        (lambda: R.train_forward(np.ones((4, 3)), axis=2), "out of range"),
        (lambda: R.train_forward(np.ones((4, 3)), axis=0), "batch axis"),
        (lambda: R.train_forward(np.ones((4, 3)), dtype=np.int64), "floating-point"),
        (lambda: R.eval_forward(np.ones((4, 3)), np.zeros(4), np.ones(3)), "running_mean"),
        (lambda: R.eval_forward(np.ones((4, 3)), np.zeros(3), np.ones(3), eps=-1.0), "eps"),
        (lambda: R.backward_stages(np.ones((4, 2)), R.train_forward(np.eye(4)[:, :3])[1]),
         "dy must have"),
        (lambda: R.backward_closed_form(np.ones((4, 2)), R.train_forward(np.eye(4)[:, :3])[1]),
         "dy must have"),
        (lambda: R.update_running_stats(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), 1),
         "m >= 2"),
        (lambda: R.update_running_stats(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), 4,
                                        momentum=1.5), r"momentum must lie in \[0, 1\]"),
        (lambda: R.update_running_stats(np.zeros(3), np.ones(2), np.zeros(3), np.ones(3), 4),
         "one length"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numerical_gradient_of_a_known_function():
    x = np.array([[0.5, -1.0], [2.0, 3.0]])
    grad = R.numerical_gradient(lambda v: float((v**3).sum()), x)
    _assert_close(grad, 3 * x**2, FD_TOL)
    np.testing.assert_array_equal(x, [[0.5, -1.0], [2.0, 3.0]])  # the input is left as it was


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis)

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def batches(draw, min_batch=2):
    """A (N, C, L) float64 batch with moderate values, and its channel axis (1 or -1)."""
    n = draw(st.integers(min_batch, 6))
    c = draw(st.integers(1, 4))
    length = draw(st.integers(1, 4))
    elements = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False)
    x = draw(arrays(np.float64, (n, c, length), elements=elements))
    axis = draw(st.sampled_from([1, -1]))
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x, axis


def _spread(x, axis):
    """The smallest per-channel standard deviation (how far from a constant channel)."""
    dims = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    return float(x.std(axis=dims).min())


@PROPERTY_SETTINGS
@given(batches(), st.floats(-1e3, 1e3), st.floats(1e-2, 1e2))
def test_x_hat_is_shift_and_scale_invariant(batch, shift, scale):
    x, axis = batch
    assume(_spread(x, axis) > 1e-1)  # a near-constant channel amplifies rounding in x - mu
    eps = 1e-5
    _, cache = R.train_forward(x, eps=eps, axis=axis)
    _, shifted = R.train_forward(x + shift, eps=eps, axis=axis)
    # exact invariance under scaling once eps scales with the variance
    _, scaled = R.train_forward(scale * x, eps=eps * scale**2, axis=axis)
    np.testing.assert_allclose(shifted.x_hat, cache.x_hat, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(scaled.x_hat, cache.x_hat, rtol=1e-9, atol=1e-9)
    # with eps fixed the difference is the eps effect: x_hat * (sqrt((v+eps)/(v+eps/scale^2)) - 1)
    _, scaled_fixed_eps = R.train_forward(scale * x, eps=eps, axis=axis)
    v = cache.var.min()
    bound = abs(np.sqrt((v + eps) / (v + eps / scale**2)) - 1.0) * np.abs(cache.x_hat).max()
    assert np.abs(scaled_fixed_eps.x_hat - cache.x_hat).max() <= bound + 1e-9


@PROPERTY_SETTINGS
@given(batches(), st.sampled_from([1e-5, 1e-3, 1e-1]))
def test_per_channel_zero_mean_and_unit_variance_up_to_eps(batch, eps):
    x, axis = batch
    _, cache = R.train_forward(x, eps=eps, axis=axis)
    dims = tuple(a for a in range(x.ndim) if a != cache.axis)
    mean_hat = cache.x_hat.mean(axis=dims)
    var_hat = cache.x_hat.var(axis=dims)
    np.testing.assert_allclose(mean_hat, 0.0, atol=1e-9)
    # the eps effect: var(x_hat) = v / (v + eps), 1 when v >> eps, 0 for a constant channel
    np.testing.assert_allclose(var_hat, cache.var / (cache.var + eps), rtol=1e-9, atol=1e-9)


@PROPERTY_SETTINGS
@given(batches(), st.sampled_from([1e-5, 1e-1]))
def test_identity_recovery(batch, eps):
    """gamma = sqrt(var + eps), beta = mean undo the normalization: y == x."""
    x, axis = batch
    _, cache = R.train_forward(x, eps=eps, axis=axis)
    y, _ = R.train_forward(x, np.sqrt(cache.var + eps), cache.mean, eps, axis=axis)
    np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-9)


@st.composite
def batch_sequences(draw):
    """K batches of (m, C) values, the same C and m throughout."""
    k = draw(st.integers(1, 6))
    m = draw(st.integers(2, 5))
    c = draw(st.integers(1, 3))
    elements = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False)
    return [draw(arrays(np.float64, (m, c), elements=elements)) for _ in range(k)]


def _run_updates(sequence, momentum):
    c = sequence[0].shape[1]
    running_mean, running_var, count = np.zeros(c), np.ones(c), 0
    for x in sequence:
        _, cache = R.train_forward(x)
        running_mean, running_var, count = R.update_running_stats(
            running_mean, running_var, cache.mean, cache.var, cache.m, momentum, count)
    return running_mean, running_var, count


@PROPERTY_SETTINGS
@given(batch_sequences())
def test_cumulative_average_is_the_mean_of_the_batch_statistics(sequence):
    """momentum=None: E[x] = average of the batch means, Var[x] = average unbiased variance."""
    running_mean, running_var, count = _run_updates(sequence, None)
    assert count == len(sequence)
    np.testing.assert_allclose(running_mean, np.mean([x.mean(0) for x in sequence], axis=0),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(running_var, np.mean([x.var(0, ddof=1) for x in sequence], axis=0),
                               rtol=1e-10, atol=1e-9)


@PROPERTY_SETTINGS
@given(batch_sequences(), st.floats(0.0, 1.0))
def test_constant_momentum_is_a_geometric_weighting(sequence, momentum):
    """running_K = (1-p)^K running_0 + sum_k p (1-p)^(K-k) batch_k, with p = momentum."""
    running_mean, running_var, _ = _run_updates(sequence, momentum)
    k = len(sequence)
    weights = [momentum * (1.0 - momentum) ** (k - i) for i in range(1, k + 1)]
    initial_weight = (1.0 - momentum) ** k
    expected_mean = sum(w * x.mean(0) for w, x in zip(weights, sequence, strict=True))
    expected_var = initial_weight * 1.0 + sum(
        w * x.var(0, ddof=1) for w, x in zip(weights, sequence, strict=True))
    np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(running_var, expected_var, rtol=1e-10, atol=1e-9)


@PROPERTY_SETTINGS
@given(batches(), st.sampled_from([1e-5, 1e-1]), st.integers(0, 2**32 - 1))
def test_backward_stages_equal_closed_form_and_dx_sums_to_zero(batch, eps, seed):
    """The two backward passes agree on any batch; and since y does not change when a constant
    is added to a channel (exact shift invariance), dx sums to zero over each channel."""
    x, axis = batch
    rng = np.random.default_rng(seed)
    channels = x.shape[axis]
    gamma, beta, dy = rng.normal(size=channels), rng.normal(size=channels), rng.normal(size=x.shape)
    _, cache = R.train_forward(x, gamma, beta, eps, axis=axis)
    stages, closed = R.backward_stages(dy, cache), R.backward_closed_form(dy, cache)
    for a, b in zip(stages, closed, strict=True):
        # gradients scale with invstd <= 1/sqrt(eps): compare relative to that size
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8 / np.sqrt(eps))
    dims = tuple(a for a in range(x.ndim) if a != cache.axis)
    np.testing.assert_allclose(stages[0].sum(axis=dims), 0.0, atol=1e-8 / np.sqrt(eps))
