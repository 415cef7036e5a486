"""batchnorm.BatchNorm1d/2d/3d against torch.nn in float64, over several training steps.

Every constructor flag x dtype x layout x rank x train/eval: outputs, input gradients, parameter
gradients and all buffers after each step. The reference is torch.nn's module run in float64 on
the same (rounded) input values, so low-precision cases measure our error, not torch's.
"""

import collections
import itertools

import pytest
import torch

import batchnorm
from batchnorm.kernels.composite import stat_dtype
from tests.utils import assert_close, check_forward_backward, make_inputs, parameter_pairs

OURS = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
        5: batchnorm.BatchNorm3d}
THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
          5: torch.nn.BatchNorm3d}
SHAPES = {2: (9, 3), 3: (4, 3, 5), 4: (3, 3, 5, 4), 5: (2, 3, 3, 2, 5)}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FLAGS = [  # (affine, bias, track_running_stats, momentum)
    (affine, bias, track, momentum)
    for (affine, bias), track, momentum in itertools.product(
        [(True, True), (True, False), (False, False)], [True, False], [0.1, None])
]
RANK_LAYOUTS = [(r, "contiguous") for r in SHAPES] + [(r, "noncontiguous") for r in SHAPES] + [
    (4, "channels_last"), (5, "channels_last")]


def make_pair(rank, affine, bias, track, momentum, dtype, num_features=3):
    """Ours in `dtype` and torch's in float64, with the same random parameters and buffers."""
    ours = OURS[rank](num_features, momentum=momentum, affine=affine, bias=bias,
                      track_running_stats=track).to(dtype)
    theirs = THEIRS[rank](num_features, momentum=momentum, affine=affine, bias=bias,
                          track_running_stats=track).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float64) * 0.5 + 1)
        if track:
            ours.running_mean.copy_(torch.randn(num_features))
            ours.running_var.copy_(torch.rand(num_features) + 0.5)
    theirs.load_state_dict({k: v.double() if v.is_floating_point() else v
                            for k, v in ours.state_dict().items()})
    return ours, theirs


def compare_buffers(ours, theirs, dtype, count, what):
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        if a.is_floating_point():
            assert a.dtype == dtype, f"{what}: buffer {name} changed dtype to {a.dtype}"
            assert_close(a, b, dtype, count, f"{what}: buffer {name}")
        else:
            assert torch.equal(a, b), f"{what}: {name} {a} != {b}"


def step_matches(ours, theirs, shape, dtype, layout, seed, what, input_dtype=None):
    """One forward + backward of both modules (ours in `dtype`) on the same input rounded to
    input_dtype (default `dtype`): output, input and parameter gradients, within the input
    dtype's tolerance (check_forward_backward); then every buffer, within the module's."""
    input_dtype = input_dtype or dtype
    count = shape[0] * torch.Size(shape[2:]).numel()
    inputs = make_inputs(shape, input_dtype, layout, seed)
    y, _ = check_forward_backward(ours, theirs, {"input": inputs.x}, input_dtype,
                                  reduction_size=count, dy=inputs.dy,
                                  params=parameter_pairs(ours, theirs), what=what)
    assert y.dtype == input_dtype, f"{what}: output dtype {y.dtype}"
    compare_buffers(ours, theirs, dtype, count, what)


@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine,bias,track,momentum", FLAGS)
def test_matches_torch_over_training_steps(rank, layout, dtype, affine, bias, track, momentum):
    torch.manual_seed(0)
    ours, theirs = make_pair(rank, affine, bias, track, momentum, dtype)
    for step in range(3):
        step_matches(ours, theirs, SHAPES[rank], dtype, layout, step, f"train step {step}")
    ours.eval()
    theirs.eval()
    step_matches(ours, theirs, SHAPES[rank], dtype, layout, 10, "eval")


ODD_SHAPES = [(2, 1), (2, 1, 1, 1), (2, 5, 1, 1), (7, 1, 13), (2, 3, 11, 13), (5, 7, 3, 1, 2),
              (64, 2), (3, 17, 1)]


ODD_CASES = [(s, "contiguous") for s in ODD_SHAPES] + [
    (s, "channels_last") for s in ODD_SHAPES if len(s) >= 4]


@pytest.mark.parametrize("shape,layout", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_odd_shapes(shape, dtype, layout):
    ours, theirs = make_pair(len(shape), True, True, True, 0.1, dtype, num_features=shape[1])
    for step in range(2):
        step_matches(ours, theirs, shape, dtype, layout, step, f"{shape} step {step}")


def test_mixed_precision_input_with_float32_module():
    """fp16 activations through a float32 module (parameters and buffers stay float32)."""
    ours, theirs = make_pair(4, True, True, True, 0.1, torch.float32)
    step_matches(ours, theirs, (4, 3, 6, 6), torch.float32, "contiguous", 3, "fp16 input",
                 input_dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Drop-in behaviour: classes, state_dicts, flags changed after construction, special batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 4, 5])
def test_is_a_torch_batchnorm_with_the_same_state(rank):
    ours, theirs = OURS[rank](6), THEIRS[rank](6)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(ours, THEIRS[rank])
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


def test_state_dicts_load_both_ways_including_old_checkpoints():
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3))
    ours = batchnorm.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.running_var, theirs.running_var)
    # A checkpoint from before num_batches_tracked existed (version 1 metadata, no such key).
    old = collections.OrderedDict(
        (k, v) for k, v in theirs.state_dict().items() if k != "num_batches_tracked")
    old._metadata = {"": {"version": 1}}
    fresh = batchnorm.BatchNorm2d(4)
    fresh.load_state_dict(old)
    assert fresh.num_batches_tracked.item() == 0
    assert torch.equal(fresh.running_mean, theirs.running_mean)


def test_constructor_signature_matches_torch():
    import inspect
    for ours, theirs in [(batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
                         (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d),
                         (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d)]:
        assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    m = batchnorm.BatchNorm2d(5, 1e-3, 0.3, True, True, None, torch.float64, bias=False)
    assert m.bias is None and m.weight.dtype == torch.float64 and m.eps == 1e-3


def test_momentum_none_is_the_cumulative_average():
    torch.manual_seed(0)
    m = batchnorm.BatchNorm1d(3, momentum=None)
    xs = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
    for x in xs:
        m(x)
    means = torch.stack([x.mean(0) for x in xs])
    unbiased = torch.stack([x.var(0, unbiased=True) for x in xs])
    # running stats start at (0, 1) and the first batch replaces them (factor 1/1)
    torch.testing.assert_close(m.running_mean, means.mean(0))
    torch.testing.assert_close(m.running_var, unbiased.mean(0))
    assert m.num_batches_tracked.item() == 4


def test_turning_tracking_off_freezes_the_buffers():
    m = batchnorm.BatchNorm2d(3)
    with torch.no_grad():
        m.running_mean.fill_(0.5)
    m.track_running_stats = False
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 2, 2) * 3 + 2
    y = m(x)  # training: batch statistics, buffers frozen
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(before)
    ref.track_running_stats = False
    torch.testing.assert_close(y, ref(x))
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(x), ref(x))  # eval still uses the frozen buffers


def test_reset_methods():
    m = batchnorm.BatchNorm1d(3)
    m(torch.randn(8, 3) + 5)
    with torch.no_grad():
        m.weight.fill_(3)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(3)) and m.num_batches_tracked.item() == 0
    assert m.weight[0].item() == 3
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))


def test_empty_batch_like_torch():
    for train in (True, False):
        ours, theirs = batchnorm.BatchNorm2d(3).train(train), torch.nn.BatchNorm2d(3).train(train)
        with torch.no_grad():
            for m in (ours, theirs):
                m.running_mean.fill_(2.0)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y, y_ref = ours(x), theirs(x)
        torch.testing.assert_close(y, y_ref)  # shape, dtype and device: there are no values
        y.sum().backward()
        assert torch.equal(ours.weight.grad, torch.zeros(3))
        assert x.grad.shape == x.shape
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k


def test_lazy_modules_become_the_eager_class():
    for lazy, eager, shape in [(batchnorm.LazyBatchNorm1d, batchnorm.BatchNorm1d, (4, 6)),
                               (batchnorm.LazyBatchNorm2d, batchnorm.BatchNorm2d, (2, 6, 3, 3)),
                               (batchnorm.LazyBatchNorm3d, batchnorm.BatchNorm3d, (2, 6, 2, 2, 2))]:
        m = lazy()
        y = m(torch.randn(shape))
        assert type(m) is eager and m.num_features == 6 and m.running_mean.shape == (6,)
        assert y.shape == shape and m.num_batches_tracked.item() == 1


def test_convert_and_back_keeps_state_and_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5),
                            torch.nn.BatchNorm1d(5)))
    x = torch.randn(4, 3, 6, 6)
    model(x)
    model.eval()
    expected = model(x)
    weight = model[1].weight
    converted = batchnorm.convert(model)
    assert type(converted[1]) is batchnorm.BatchNorm2d
    assert type(converted[3][2]) is batchnorm.BatchNorm1d
    assert converted[1].weight is weight  # the same Parameter: optimizers keep working
    assert not converted[1].training
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-6)
    back = batchnorm.to_torch(converted)
    assert type(back[1]) is torch.nn.BatchNorm2d
    torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-6)
    single = batchnorm.convert(torch.nn.BatchNorm3d(2))
    assert type(single) is batchnorm.BatchNorm3d


def test_fused_modules_match_unfused():
    torch.manual_seed(0)
    plain, fused = batchnorm.BatchNorm2d(4), batchnorm.BatchNormReLU2d(4)
    add_fused = batchnorm.BatchNormAddReLU2d(4)
    for m in (plain, fused, add_fused):
        m.double()
    inputs = make_inputs((3, 4, 5, 5), torch.float64)
    count = 3 * 5 * 5
    check_forward_backward(fused, lambda x: torch.relu(plain(x)), {"input": inputs.x},
                           torch.float64, reduction_size=count,
                           params=parameter_pairs(fused, plain), what="BN + ReLU")
    check_forward_backward(add_fused, lambda x, r: torch.relu(plain(x) + r),
                           {"input": inputs.x, "residual": inputs.residual}, torch.float64,
                           reduction_size=count, params=parameter_pairs(add_fused, plain),
                           what="BN + add + ReLU")
    torch.testing.assert_close(fused.running_var, add_fused.running_var)  # one step each
    assert stat_dtype(torch.float16) == torch.float32


@pytest.mark.parametrize("rank", [4, 5])
def test_residual_gradient_keeps_channels_last(rank):
    ours = (batchnorm.BatchNormAddReLU2d if rank == 4 else batchnorm.BatchNormAddReLU3d)(3)
    theirs = THEIRS[rank](3).double()
    shape = SHAPES[rank]
    inputs = make_inputs(shape, torch.float32, "channels_last")
    check_forward_backward(ours, lambda x, r: torch.relu(theirs(x) + r),
                           {"input": inputs.x, "residual": inputs.residual}, torch.float32,
                           reduction_size=shape[0] * torch.Size(shape[2:]).numel(),
                           params=parameter_pairs(ours, theirs))


def test_torch_fx_keeps_our_layers_as_leaves():
    """fx must not trace into BN (that would freeze the train/eval branch): a call_module."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4),
                                batchnorm.BatchNormReLU2d(4))
    traced = torch.fx.symbolic_trace(model)
    assert [n.op for n in traced.graph.nodes] == ["placeholder"] + ["call_module"] * 3 + ["output"]
    x = torch.randn(2, 3, 6, 6)
    traced.eval()
    model.eval()
    torch.testing.assert_close(traced(x), model(x))  # the mode switch still reaches the layer
    assert type(model[1]).__module__ == "batchnorm.nn"  # the class (pickling) is unchanged


def test_relu_flag_is_public_and_read_only_as_a_bool():
    """`relu` says which layers fuse a ReLU; a child module named relu is not that flag."""
    from batchnorm.nn import fuses_relu

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.relu = torch.nn.BatchNorm2d(2), torch.nn.ReLU()

    fused = [batchnorm.BatchNormReLU1d(2), batchnorm.BatchNormReLU2d(2),
             batchnorm.BatchNormReLU3d(2), batchnorm.BatchNormAddReLU2d(2),
             batchnorm.BatchNormAddReLU3d(2), batchnorm.SyncBatchNorm(2, relu=True),
             batchnorm.FrozenBatchNorm2d(2, relu=True)]
    plain = [batchnorm.BatchNorm2d(2), batchnorm.SyncBatchNorm(2), torch.nn.BatchNorm2d(2),
             batchnorm.FrozenBatchNorm2d(2), Block()]
    assert all(m.relu is True for m in fused)
    assert [fuses_relu(m) for m in fused + plain] == [True] * len(fused) + [False] * len(plain)


def test_only_the_add_relu_layers_take_a_residual():
    """forward(input) as torch.nn's; BatchNormAddReLU*d.forward(input, residual), required."""
    x = torch.randn(2, 3, 4, 4)
    for layer in (batchnorm.BatchNorm2d(3), batchnorm.BatchNormReLU2d(3)):
        with pytest.raises(TypeError):
            layer(x, x)
    for layer, input in ((batchnorm.BatchNormAddReLU2d(3), x),
                         (batchnorm.BatchNormAddReLU3d(3), x[..., None])):
        torch.testing.assert_close(layer(input, input), torch.relu(
            torch.nn.functional.batch_norm(input, None, None, training=True) + input))
        with pytest.raises(TypeError, match="residual"):
            layer(input)


@pytest.mark.parametrize("bias", [True, False])
def test_layers_build_with_a_torch_without_bias_argument(monkeypatch, bias):
    # torch.nn takes bias= from torch 2.13: with an older torch (torch 2.11 on a GPU machine),
    # the layer is built without passing it, and bias=False still gives a layer without a shift.
    from batchnorm import nn as bn_nn

    newer = batchnorm.BatchNorm2d(3, bias=bias)
    monkeypatch.setattr(bn_nn, "_TORCH_TAKES_BIAS", False)
    older = batchnorm.BatchNorm2d(3, bias=bias)
    assert (older.bias is None) == (newer.bias is None) == (not bias)
    assert list(older.state_dict()) == list(newer.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(older(x), newer(x))
