"""On a GPU: the default route (torch's kernels, cuDNN: the router's route 4) and the Triton route
(route 3, when selected) against torch.nn on the same GPU and against torch.nn in float64 on the
CPU; the NaN/Inf guard there; a converted small CNN trained there.

The CUDA tests run where torch.cuda.is_available() (scripts/gpu_check.sh runs this file on a GPU
machine) and are skipped elsewhere with the reason. Every check is a helper that takes the device
and the backend (tests/cuda_checks.py), and the CPU tests at the end run the same helpers on CPU
tensors: route 4 forced
with kernels.use("aten") (bit for bit, as on CUDA), route 3 on the composite (the Python path
the Triton kernels take on CUDA: ops, _BatchNormTrain, the composite's fused ops, to tolerance),
and deliberately wrong layers that the helpers must reject, so a helper that compares nothing
fails on the CPU rather than passing silently on the GPU.

What a case compares, after each of three training steps and an eval step (with gradients, and
again under no_grad): the output; the gradients of the input, the residual, the weight and the
bias; running_mean, running_var and num_batches_tracked; the layout; which operators ran (the
dispatcher's namespaces, and on the Triton route the Triton primitives called). Against torch.nn
on the same device: exactly on torch's kernels, within the dtype's tolerance on ours. Against
torch.nn in float64 on the CPU, on the same (rounded) values: within the dtype's tolerance
(tests/utils.py's table, grown with the reduction size), or, where torch.nn's own result on the
device is further off than that (a warning then says so), no further off than twice torch.nn's.
"""

import pytest
import torch

import batchnorm
from batchnorm import kernels
from tests.cuda_checks import (
    DEFAULT_CASES,
    F64,
    TRITON_CASES,
    Case,
    assert_near_float64,
    build,
    case_params,
    check_case,
    check_cnn,
    check_environment_selects,
    check_functional_fused,
    check_nan_guard,
    step,
)

ON_GPU = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not ON_GPU, reason="no CUDA device here: the CUDA checks run on a GPU machine "
    "(scripts/gpu_check.sh); the same helpers run on CPU tensors in this file's CPU tests")


def _triton_serves_cuda() -> bool:
    """Whether kernels.use('triton') can serve CUDA tensors here (never imports triton without a
    GPU: tests/test_kernels_triton.py must import it first, under its interpreter)."""
    if not ON_GPU:
        return False
    try:
        with kernels.use("triton"):
            return True
    except RuntimeError:
        return False


needs_triton = pytest.mark.skipif(
    not _triton_serves_cuda(), reason="the Triton route needs a CUDA device and triton "
    "(pip install 'batchnorm[gpu]')")

# ---------------------------------------------------------------------------------------------
# On CUDA
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def triton_calls(monkeypatch) -> list[str]:
    """The Triton primitives called (by name) while the test runs, through the ops' CUDA kernels
    (kernels._cuda_kernel looks them up on the module at each call)."""
    from batchnorm.kernels import triton as triton_kernels

    calls: list[str] = []

    def recording(name: str):
        original = getattr(triton_kernels, name)

        def recorded(*args):
            calls.append(name)
            return original(*args)
        return recorded

    for name in kernels.PRIMITIVES:
        monkeypatch.setattr(triton_kernels, name, recording(name))
    return calls


@needs_cuda
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_default_route_on_cuda_is_torch_nn(case):
    check_case(case, "cuda", "default", route="aten")


@needs_triton
@pytest.mark.parametrize("case", case_params(TRITON_CASES))
def test_triton_route_on_cuda_matches_torch_nn(case, triton_calls):
    check_case(case, "cuda", "triton", route="triton", triton_calls=triton_calls)


@needs_cuda
@pytest.mark.parametrize("backend", ["default", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"),
                                          (torch.bfloat16, "channels_last")])
def test_nan_batch_leaves_the_buffers_on_cuda(backend, momentum, dtype, layout):
    check_nan_guard("cuda", backend, momentum, dtype, layout)


@needs_cuda
@pytest.mark.parametrize("backend", ["default", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_converted_cnn_trains_on_cuda_as_torch_nn(backend, layout):
    check_cnn("cuda", backend, layout)


@needs_cuda
@pytest.mark.parametrize("backend,dtype", [
    ("default", torch.float32),  # torch's kernels, then the add and the ReLU in the input dtype
    pytest.param("triton", torch.float32, marks=needs_triton),
    pytest.param("triton", torch.bfloat16, marks=needs_triton)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_fused_residual_relu_on_cuda(backend, training, dtype):
    check_functional_fused("cuda", backend, training, dtype)


@needs_triton
@pytest.mark.slow
def test_environment_selects_triton_on_cuda():
    check_environment_selects("cuda", "triton")


@needs_cuda
def test_cuda_tensors_default_to_torchs_kernels():
    x = torch.empty(2, 3, device="cuda")
    assert kernels.backend_name(x) == "aten"
    with kernels.use("aten"):
        assert kernels.backend_name(x) == "aten"
    with kernels.use("composite"):
        assert kernels.backend_name(x) == "composite"


# ---------------------------------------------------------------------------------------------
# The same helpers on the CPU, and their failures on wrong layers
# ---------------------------------------------------------------------------------------------

CPU_CASES = [Case((8, 3)), Case((4, 3, 7, 5), "channels_last", torch.bfloat16),
             Case((2, 3, 3, 7, 5), "channels_last", kind="add-relu", momentum=None),
             Case((4, 3, 7), kind="relu", affine=False, track_running_stats=False)]


@pytest.mark.parametrize("backend", ["aten", "composite"])
@pytest.mark.parametrize("case", case_params(CPU_CASES))
def test_case_helper_on_cpu(case, backend):
    check_case(case, "cpu", backend, route=backend)


@pytest.mark.parametrize("backend", ["aten", "composite"])
def test_case_helper_rejects_a_wrong_layer(backend):
    # A bias off by 1e-2 (torch's kernels: by one float32 ulp) fails the first output comparison
    case = Case((4, 3, 7, 5), "channels_last")
    layers = build(case, "cpu")
    with torch.no_grad():
        bias = layers.ours.bias
        bias.copy_(bias + 1e-2 if backend == "composite" else torch.nextafter(bias, bias + 1))
    with kernels.use(backend), pytest.raises(AssertionError, match="training step 0: output"):
        step(layers, case, "cpu", 0, True, True, backend, what="training step 0")


def test_case_helper_rejects_wrong_running_stats():
    # A momentum of 0.11 instead of 0.1 passes the first output and gradients, not the buffers
    case = Case((8, 3))
    layers = build(case, "cpu")
    layers.ours.momentum = 0.11
    with kernels.use("composite"), pytest.raises(AssertionError, match="step 0: running_mean"):
        step(layers, case, "cpu", 0, True, True, "composite", what="step 0")


def test_case_helper_rejects_the_wrong_route():
    case = Case((8, 3))
    with pytest.raises(AssertionError, match="expected torch's kernels only"):
        with kernels.use("composite"):
            step(build(case, "cpu"), case, "cpu", 0, True, True, "aten", what="step 0")


def test_float64_check_holds_ours_to_the_tolerance():
    reference = torch.linspace(-2, 2, 50, dtype=F64)
    exact = reference.float()
    off = exact + 1e-3  # beyond float32's tolerance, within bfloat16's
    assert_near_float64(exact, exact, reference, 1, "exact")
    with pytest.raises(AssertionError, match="off float64 by up to"):
        assert_near_float64(off, exact, reference, 1, "off")
    with pytest.warns(RuntimeWarning, match="torch.nn's own result is off float64"):
        assert_near_float64(off, off + 1e-3, reference, 1, "torch.nn further off")
    with pytest.raises(AssertionError):
        assert_near_float64(torch.full_like(exact, float("nan")), exact, reference, 1, "NaN")


@pytest.mark.parametrize("backend", ["aten", "composite"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_nan_guard_helper_on_cpu(backend, momentum):
    check_nan_guard("cpu", backend, momentum, torch.float32, "channels_last")


@pytest.mark.parametrize("backend", ["aten", "composite"])
def test_cnn_helper_on_cpu(backend):
    check_cnn("cpu", backend, "channels_last" if backend == "composite" else "contiguous")


def test_cnn_helper_rejects_a_different_model(monkeypatch):
    # torch's kernels on both sides, but ours' layers have momentum 0.2: the same losses (batch
    # statistics), other running statistics
    monkeypatch.setattr(batchnorm, "convert", _converted_with(momentum=0.2))
    with pytest.raises(AssertionError, match="bn1.running_mean after 3 steps"):
        check_cnn("cpu", "aten", "contiguous")


def _converted_with(**attributes):
    """batchnorm.convert, then the given attributes set on every converted layer."""
    convert = batchnorm.convert

    def converted(model, **kwargs):
        model = convert(model, **kwargs)
        for module in model.modules():
            if isinstance(module, batchnorm.BatchNorm2d):
                for name, value in attributes.items():
                    setattr(module, name, value)
        return model
    return converted


@pytest.mark.parametrize("backend,dtype", [("aten", torch.float32),
                                           ("composite", torch.bfloat16)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_helper_on_cpu(backend, training, dtype):
    check_functional_fused("cpu", backend, training, dtype)


@pytest.mark.slow
def test_environment_helper_on_cpu():
    check_environment_selects("cpu", "composite")
