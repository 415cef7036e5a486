"""The model tools on the zoo: strip redundant biases and fold BN, outputs and gradients kept."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.tools import fold_bn, strip_redundant_biases
from tests.zoo import ZOO

# Tolerances for comparing a model before and after surgery, keyed by dtype. The surgery only
# regroups sums (a removed constant, a scaled weight), so float64 agrees to a few ulps of the
# activations; float32 to a few of its ulps times the depth of the zoo's nets.
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10),
              torch.float32: dict(rtol=2e-4, atol=2e-5)}

# Redundant biases each zoo model must have (a test that cannot fail would count nothing).
EXPECTED_STRIPPED = {"resnet_basic": 4, "resnet_bottleneck": 2, "vgg_bn": 4, "mobilenet_v2": 6,
                     "densenet_block": 3, "unet_decoder": 4, "mlp": 2, "audio_1d": 2, "conv3d": 3,
                     "densenet_concat": 4, "inception_block": 4, "sum_merge": 5}
EXPECTED_FOLDED = {"resnet_basic": 4, "resnet_bottleneck": 8, "vgg_bn": 3, "mobilenet_v2": 7,
                   "densenet_block": 3, "unet_decoder": 4, "mlp": 3, "audio_1d": 3, "conv3d": 3,
                   "densenet_concat": 3, "inception_block": 1, "sum_merge": 1}


def _cast(x, dtype):
    return tuple(t.to(dtype) for t in x) if isinstance(x, tuple) else x.to(dtype)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _zoo(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model, x = ZOO[name]()
    return model.to(dtype), _cast(x, dtype)


def _fresh_batch(x, seed):
    # a zoo model's input(s), shaped as its example, not a batch-norm case: not make_inputs
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) * 2 + 0.5 for t in _as_tuple(x))


def _assert_close(a, b, dtype, what):
    torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(ZOO))
def test_strip_keeps_outputs_gradients_and_buffers_in_train_and_eval(name):
    dtype = torch.float64
    model, x = _zoo(name, dtype)
    stripped, report = strip_redundant_biases(model, x)
    assert len(report.removed) == EXPECTED_STRIPPED[name], report.summary()
    removed = {f"{r.layer}.bias" for r in report.removed}
    assert report.parameters_removed == sum(model.get_parameter(p).numel() for p in removed)
    assert removed.isdisjoint(dict(stripped.named_parameters()))
    assert report.max_abs_diff < 1e-10 and report.max_abs_diff_train < 1e-10
    original = copy.deepcopy(model)
    original.train(), stripped.train()
    sgd_a = torch.optim.SGD(original.parameters(), lr=0.05)
    sgd_b = torch.optim.SGD(stripped.parameters(), lr=0.05)
    weights = None
    for step in range(3):  # SGD steps update parameters and running stats; compared each step
        inputs_a = [t.requires_grad_() for t in _fresh_batch(x, step)]
        inputs_b = [t.detach().clone().requires_grad_() for t in inputs_a]
        torch.manual_seed(step)  # the same dropout masks for both
        out_a = original(*inputs_a)
        torch.manual_seed(step)
        out_b = stripped(*inputs_b)
        _assert_close(out_b, out_a, dtype, f"train output, step {step}")
        weights = torch.randn_like(out_a) if weights is None else weights
        original.zero_grad(), stripped.zero_grad()
        (out_a * weights).sum().backward()
        (out_b * weights).sum().backward()
        for t_a, t_b in zip(inputs_a, inputs_b, strict=True):
            _assert_close(t_b.grad, t_a.grad, dtype, f"input grad, step {step}")
        params_a = dict(original.named_parameters())
        for pname, p in stripped.named_parameters():
            _assert_close(p.grad, params_a[pname].grad, dtype, f"grad of {pname}, step {step}")
        for pname in removed:  # BN cancels it in training: no gradient, so SGD leaves it alone
            _assert_close(params_a[pname].grad, torch.zeros_like(params_a[pname]), dtype,
                          f"grad of the removed {pname}, step {step}")
        sgd_a.step(), sgd_b.step()
    shift = {}  # biases meeting one BN through cat / add: their constants add up
    for r in report.removed:
        key = f"{r.bn}.running_mean"
        shift[key] = shift.get(key, 0) + r.channel_bias
    buffers_a = dict(original.named_buffers())
    for bname, b in stripped.named_buffers():
        expected = buffers_a[bname] - shift[bname] if bname in shift else buffers_a[bname]
        _assert_close(b, expected.to(b.dtype), dtype, f"buffer {bname} after training steps")
    original.eval(), stripped.eval()
    inputs = _fresh_batch(x, 10)
    _assert_close(stripped(*inputs), original(*inputs), dtype, "eval output")


@pytest.mark.parametrize("name", list(ZOO))
def test_fold_keeps_eval_outputs_and_leaves_the_original_alone(name):
    dtype = torch.float64
    model, x = _zoo(name, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    folded, report = fold_bn(model, x)
    assert len(report.folded) == EXPECTED_FOLDED[name], report.summary()
    assert report.max_abs_diff < 1e-10
    assert [type(m) for m in model.modules()] == kinds, "the original model's modules changed"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original's state changed"
    training = [n for n, m in folded.named_modules() if m.training]
    assert not training, f"modules of the eval-mode copy in training mode: {training}"
    remaining = [n for n, m in folded.named_modules() if isinstance(m, _BatchNorm)]
    assert len(remaining) == len(report.skipped), (remaining, report.skipped)
    assert report.parameters_after < report.parameters_before
    inputs = _fresh_batch(x, 3)
    model.eval()
    _assert_close(folded(*inputs), model(*inputs), dtype, "eval output after folding")


@pytest.mark.parametrize("name", ["resnet_basic", "unet_decoder", "conv3d"])
def test_fold_float32_within_float32_tolerance(name):
    model, x = _zoo(name, torch.float32)
    folded, _ = fold_bn(model, x)
    inputs = _fresh_batch(x, 4)
    _assert_close(folded(*inputs), model.eval()(*inputs), torch.float32, "float32 fold")


def _round_trip(model_after, build_structure, x):
    buffer = io.BytesIO()
    torch.save(model_after.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_structure()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # strict: same keys
    inputs = _fresh_batch(x, 5)
    model_after.eval(), fresh.eval()
    _assert_close(fresh(*inputs), model_after(*inputs), torch.float64, "after state_dict load")


@pytest.mark.parametrize("name", list(ZOO))
def test_state_dicts_round_trip(name):
    model, x = _zoo(name)
    stripped, _ = strip_redundant_biases(model, x)
    folded, _ = fold_bn(model, x)
    # the structure is rebuilt from a differently initialised model: the analysis is structural
    _round_trip(stripped, lambda: strip_redundant_biases(_zoo(name, seed=7)[0], x)[0], x)
    _round_trip(folded, lambda: fold_bn(_zoo(name, seed=7)[0], x)[0], x)


def test_fused_relu_bn_keeps_its_relu_when_folded():
    model, x = _zoo("resnet_basic")
    folded, _ = fold_bn(model, x)
    assert isinstance(folded[1], nn.ReLU)  # BatchNormReLU2d -> ReLU
    assert folded[2].bn2.relu is True  # BatchNormAddReLU2d called with a residual -> add + ReLU
