"""torch.func transforms and forward-mode AD through our modules and functional form, against
torch.nn on the same calls (float64): grad, vjp, jvp, vmap, jacrev, jacfwd, functional_call,
stack_module_state, forward_ad dual tensors; training and eval, with and without running
statistics, the fused ReLU / residual variants, 1d/2d/3d and channels_last."""

import copy

import pytest
import torch
from torch import func
from torch.autograd import forward_ad as fwAD

import batchnorm
from batchnorm.functional import batch_norm
from tests.utils import check_forward_backward, make_inputs

F64 = torch.float64


def _pair(ours_cls, theirs_cls, C, **kwargs):
    torch.manual_seed(0)
    theirs = theirs_cls(C, dtype=F64, **kwargs)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours = ours_cls(C, dtype=F64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


CASES = [  # (ours, theirs, input shape, layout)
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3), "contiguous"),
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 5), "contiguous"),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 4), "contiguous"),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 4), "channels_last"),
    (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (3, 2, 3, 4, 2), "contiguous"),
]


def _outcome(fn):
    """fn()'s result, or the type of what it raised."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001  compared by the caller
        return type(error)


def _same_outcome(ours, theirs):
    if isinstance(theirs, type):
        assert ours is theirs, f"torch raised {theirs.__name__}, we gave {ours!r}"
    else:
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape,layout", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_grad_of_functional_call(ours_cls, theirs_cls, shape, layout, training):
    ours, theirs = _pair(ours_cls, theirs_cls, shape[1])
    ours.train(training)
    theirs.train(training)
    x = make_inputs(shape, F64, layout).x

    def loss(model):  # buffers passed in, so a training step may update them
        def f(params, buffers, x):
            return func.functional_call(model, (params, buffers), (x,)).square().sum()
        return f

    def grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())
        return func.grad(loss(model), argnums=(0, 2))(params, buffers, x)

    torch.testing.assert_close(grads(ours), grads(theirs))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)

    def captured(model):  # buffers captured: torch refuses to update them under grad
        params = {k: v.detach() for k, v in model.named_parameters()}
        return _outcome(lambda: func.grad(
            lambda p: func.functional_call(model, p, (x,)).square().sum())(params))
    _same_outcome(captured(ours), captured(theirs))


@pytest.mark.parametrize("ours_cls,theirs_cls,shape,layout", CASES)
def test_vmap_after_replace_all_batch_norm_modules(ours_cls, theirs_cls, shape, layout):
    ours, theirs = _pair(ours_cls, theirs_cls, shape[1])
    func.replace_all_batch_norm_modules_(ours)
    func.replace_all_batch_norm_modules_(theirs)
    xs = torch.stack([make_inputs(shape, F64, layout, seed).x for seed in range(3)])  # (3, *shape)
    torch.testing.assert_close(func.vmap(ours)(xs), func.vmap(theirs)(xs))


@pytest.mark.parametrize("ours_cls,theirs_cls,shape,layout", CASES[:3])
def test_per_sample_gradients_in_eval(ours_cls, theirs_cls, shape, layout):
    ours, theirs = _pair(ours_cls, theirs_cls, shape[1])
    theirs.running_mean.normal_()
    theirs.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    xs = make_inputs(shape, F64, layout).x

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(params, x):
            y = func.functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return y.square().sum()
        return func.vmap(func.grad(loss), in_dims=(None, 0))(params, xs)

    torch.testing.assert_close(per_sample(ours), per_sample(theirs))


@pytest.mark.parametrize("training", [True, False])
def test_functional_form_under_vjp_jvp_jacrev_jacfwd(training):
    x = make_inputs((5, 3, 4), F64).x
    w = torch.rand(3, dtype=F64) + 0.5
    b = torch.randn(3, dtype=F64)
    stats = (None, None) if training else (torch.randn(3, dtype=F64),
                                          torch.rand(3, dtype=F64) + 0.5)

    def make(fn):
        return lambda x, w, b: fn(x, *stats, w, b, training, 0.1, 1e-5)

    ours, theirs = make(batch_norm), make(torch.nn.functional.batch_norm)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    torch.testing.assert_close(func.jvp(ours, (x, w, b), tangents),
                               func.jvp(theirs, (x, w, b), tangents))
    out, vjp_ours = func.vjp(ours, x, w, b)
    _, vjp_theirs = func.vjp(theirs, x, w, b)
    cot = torch.randn_like(out)
    torch.testing.assert_close(vjp_ours(cot), vjp_theirs(cot))
    for transform in (func.jacrev, func.jacfwd):
        torch.testing.assert_close(transform(ours, argnums=(0, 1, 2))(x, w, b),
                                   transform(theirs, argnums=(0, 1, 2))(x, w, b))
    vmapped = func.vmap(ours, in_dims=(2, None, None))
    torch.testing.assert_close(vmapped(x, w, b),
                               func.vmap(theirs, in_dims=(2, None, None))(x, w, b))


@pytest.mark.parametrize("training", [True, False])
def test_forward_ad_dual_tensors(training):
    ours, theirs = _pair(batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, 3)
    for m in (ours, theirs):
        m.train(training)
    inputs = make_inputs((4, 3, 5, 4), F64)
    x, tangent = inputs.x, inputs.dy
    results = []
    for m in (ours, theirs):
        with fwAD.dual_level():
            out = m(fwAD.make_dual(x, tangent))
            primal, out_tangent = fwAD.unpack_dual(out)
            assert out_tangent is not None
            results.append((primal, out_tangent))
    torch.testing.assert_close(results[0], results[1])
    assert results[0][1].abs().max() > 0  # never a silent zero tangent


def test_fused_variants_under_transforms():
    ours = batchnorm.BatchNormAddReLU2d(3, dtype=F64, track_running_stats=False)
    theirs = torch.nn.BatchNorm2d(3, dtype=F64, track_running_stats=False)
    inputs = make_inputs((4, 3, 5, 4), F64)
    x, residual = inputs.x, inputs.residual
    tangents = (torch.randn_like(x), torch.randn_like(residual))
    got = func.jvp(lambda x, r: ours(x, r), (x, residual), tangents)
    want = func.jvp(lambda x, r: torch.relu(theirs(x) + r), (x, residual), tangents)
    torch.testing.assert_close(got, want)
    relu_ours = batchnorm.BatchNormReLU1d(3, dtype=F64)
    relu_theirs = torch.nn.BatchNorm1d(3, dtype=F64)
    xs = torch.randn(2, 6, 3, dtype=F64)
    func.replace_all_batch_norm_modules_(relu_ours)
    func.replace_all_batch_norm_modules_(relu_theirs)
    torch.testing.assert_close(func.vmap(relu_ours)(xs),
                               func.vmap(lambda x: torch.relu(relu_theirs(x)))(xs))


def test_model_ensembling_with_stack_module_state():
    def model(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=F64),
                                  torch.nn.BatchNorm1d(3, dtype=F64), torch.nn.ReLU())
        func.replace_all_batch_norm_modules_(net)
        return net

    theirs = [model(seed) for seed in range(3)]
    ours = [batchnorm.convert(copy.deepcopy(m)) for m in theirs]
    x = torch.randn(8, 4, dtype=F64)

    def ensemble(models):
        params, buffers = func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def call(params, buffers, x):
            return func.functional_call(base, (params, buffers), (x,))
        return func.vmap(call, in_dims=(0, 0, None))(params, buffers, x)

    torch.testing.assert_close(ensemble(ours), ensemble(theirs))


def test_momentum_none_under_grad_counts_batches_as_torch():
    ours, theirs = _pair(batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, 3, momentum=None)
    for step in range(3):
        x = make_inputs((6, 3), F64, seed=step).x
        for m in (ours, theirs):
            params = {k: v.detach() for k, v in m.named_parameters()}
            buffers = dict(m.named_buffers())
            func.grad(lambda p, b, x, m=m: func.functional_call(m, (p, b), (x,)).square().sum(),
                      )(params, buffers, x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


def _opinfo_samples():
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [op for op in op_db
               if op.name == "nn.functional.batch_norm" and not op.variant_test_name]
    return list(info.sample_inputs("cpu", F64, requires_grad=True))


@pytest.mark.slow
def test_opinfo_sample_inputs_match_torch():
    # In a fresh interpreter: importing torch's test suite freezes torch.backends' global flags
    # for the rest of the process, which other tests set.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # this tree's sources, not whichever checkout the environment has installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    done = subprocess.run([sys.executable, "-c", "import tests.test_func as t; t.opinfo_check()"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def opinfo_check():
    """torch's own test inputs for F.batch_norm: outputs, gradients and mutated running stats."""
    samples = _opinfo_samples()
    assert len(samples) > 5
    for sample in samples:
        # weight and bias, where given as tensors, are differentiated as the input is
        trainable = [i for i in (2, 3) if i < len(sample.args)
                     and isinstance(sample.args[i], torch.Tensor)
                     and sample.args[i].is_floating_point()]
        x = sample.input.detach()
        theirs = _outcome(lambda s=sample, x=x: torch.nn.functional.batch_norm(
            x, *_copies(s.args), **s.kwargs))
        if isinstance(theirs, type):
            ours = _outcome(lambda s=sample, x=x: batch_norm(x, *_copies(s.args), **s.kwargs))
            assert ours is theirs, (sample, ours)
            continue
        args_ours, args_theirs = _copies(sample.args), _copies(sample.args)
        leaves = {"input": x, **{f"argument {i}": sample.args[i] for i in trainable}}
        count = x.numel() // x.shape[1] if x.dim() > 1 else x.numel()
        check_forward_backward(_with_trainable(batch_norm, args_ours, trainable, sample.kwargs),
                               _with_trainable(torch.nn.functional.batch_norm, args_theirs,
                                               trainable, sample.kwargs),
                               leaves, F64, reduction_size=count, what=str(sample))
        for a, b in zip(args_ours[:2], args_theirs[:2], strict=True):
            if isinstance(a, torch.Tensor):  # the running statistics, updated in place
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12,
                                           msg=lambda m, s=sample: f"{s}: {m}")


def _copies(args):
    return [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]


def _with_trainable(fn, args, trainable, kwargs):
    """fn(input, *args, **kwargs) as a function of the input and the arguments at `trainable`."""
    def run(input, *params):
        full = list(args)
        for i, p in zip(trainable, params, strict=True):
            full[i] = p
        return fn(input, *full, **kwargs)
    return run
