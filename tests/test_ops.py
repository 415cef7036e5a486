"""The four custom ops: torch.library.opcheck, each op's own gradients, torch.compile."""

import pytest
import torch

import batchnorm
from batchnorm import ops
from batchnorm.functional import batch_norm
from tests.utils import make_inputs

CASES = [((4, 3, 5, 6), torch.float32, "contiguous"),
         ((4, 3, 5, 6), torch.float64, "channels_last"),
         ((6, 5), torch.float64, "contiguous"), ((2, 3, 7), torch.float16, "contiguous")]


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=str)
def test_opcheck(shape, dtype, layout):
    x, dy, _, weight, bias, mean, invstd = make_inputs(shape, dtype, layout)
    differentiable = dtype == torch.float64
    if differentiable:
        for t in (x, mean, invstd, weight, bias, dy):
            t.requires_grad_()
    out = ops.elemt(x, mean, invstd, weight, bias, None, True).detach()
    m_dy, m_dyx = torch.randn_like(mean), torch.randn_like(mean)
    samples = [
        (ops.stats, (x,)),
        (ops.elemt, (x, mean, invstd, weight, bias, None, False)),
        (ops.elemt, (x, mean, invstd, None, None, x.detach().clone(), True)),
        (ops.backward_reduce, (dy, x, mean, invstd, None)),
        (ops.backward_reduce, (dy, x, mean, invstd, out)),
        (ops.backward_elemt, (dy, x, mean, invstd, weight, m_dy, m_dyx, None)),
        (ops.backward_elemt, (dy, x, mean, invstd, None, m_dy, m_dyx, out)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("relu", [False, True])
def test_each_op_gradcheck(relu):
    x, dy, _, weight, bias, mean, invstd = make_inputs((3, 2, 4), torch.float64, seed=1)
    out = ops.elemt(x, mean, invstd, weight, bias, None, True) if relu else None
    m_dy, m_dyx = torch.randn_like(mean), torch.randn_like(mean)
    leaves = [t.requires_grad_() for t in (x, mean, invstd, weight, bias, dy, m_dy, m_dyx)]
    x, mean, invstd, weight, bias, dy, m_dy, m_dyx = leaves
    checks = {
        "stats": (ops.stats, (x,)),
        "elemt": (lambda *a: ops.elemt(*a, None, relu), (x, mean, invstd, weight, bias)),
        "backward_reduce": (lambda *a: ops.backward_reduce(*a, out), (dy, x, mean, invstd)),
        "backward_elemt": (lambda *a: ops.backward_elemt(*a, out),
                           (dy, x, mean, invstd, weight, m_dy, m_dyx)),
    }
    for name, (fn, args) in checks.items():
        assert torch.autograd.gradcheck(fn, args), name
        assert torch.autograd.gradgradcheck(fn, args), name


def test_stats_are_float32_for_half_inputs():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        mean, m2 = ops.stats(torch.randn(4, 3, 2).to(dtype))
        assert mean.dtype == m2.dtype == torch.float32
    mean, m2 = ops.stats(torch.randn(4, 3, dtype=torch.float64))
    assert mean.dtype == torch.float64


def test_forward_train_without_a_graph_is_the_same_step():
    """forward_train's autograd kernel goes straight to the kernel when nothing is differentiated
    (no_grad, or no input needing a gradient): the same outputs and running statistics as the
    call that records a node, no node, and a forward-mode tangent is still refused, not dropped."""
    x = torch.randn(6, 4, dtype=torch.float64) * 3 + 1
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64)
    runs = []
    for grad in (True, False):
        buffers = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                   torch.zeros((), dtype=torch.long))
        with torch.set_grad_enabled(grad):
            out = ops.forward_train(x, weight, bias, None, False, 1e-5, *buffers, 0.1)
        assert (out[0].grad_fn is not None) == grad
        runs.append((*out, *buffers))
    for recorded, direct in zip(*runs, strict=True):
        assert torch.equal(recorded.detach(), direct)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        with torch.no_grad(), pytest.raises(RuntimeError, match="jvp"):
            ops.forward_train(dual, None, None, None, False, 1e-5, None, None, None, 0.1)


def _compiled_training_matches_eager(momentum):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = batchnorm.BatchNorm2d(3, momentum=momentum)
    compiled_module = batchnorm.BatchNorm2d(3, momentum=momentum)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = eager(x1), compiled(x2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(y2, y1)
        torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_torch_compile_fullgraph_training(momentum):
    """No graph break, momentum=None included (it breaks torch's own module: pytorch#194504)."""
    _compiled_training_matches_eager(momentum)


def test_torch_compile_fullgraph_eval_and_functional():
    torch._dynamo.reset()
    m = batchnorm.BatchNormReLU2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x))
    fn = torch.compile(lambda x: batch_norm(x, None, None, training=True), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x), batch_norm(x, None, None, training=True))


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    m = batchnorm.BatchNorm1d(4)
    ref = batchnorm.BatchNorm1d(4)
    x = torch.randn(16, 4)
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(m.running_var, ref.running_var)
