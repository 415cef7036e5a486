"""Converted models with the rest of PyTorch: torch.export (a graph of aten ops that loads and
runs without this package), torch.jit.trace and torch.jit.script, torch.compile, each against
torch.nn."""

import subprocess
import sys
import textwrap

import pytest
import torch

import batchnorm


def _model(channels_last=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8))
    x = torch.randn(4, 3, 6, 6)
    model(x)  # running statistics that differ from the defaults
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model.eval(), x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.slow
def test_export_holds_aten_ops_only_and_loads_without_batchnorm(tmp_path, channels_last):
    reference, x = _model(channels_last)
    ours = batchnorm.convert(_model(channels_last)[0])
    exported = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("batchnorm" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), reference(x))
    path = tmp_path / "model.pt2"
    torch.export.save(exported, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(reference(x), tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        program = torch.export.load({str(path)!r})
        x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        torch.testing.assert_close(program.module()(x), y)
        assert "batchnorm" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_matches_torch(training):
    reference, x = _model()
    ours = batchnorm.convert(_model()[0])
    reference.train(training)
    ours.train(training)
    traced = torch.jit.trace(ours, x, check_trace=not training)
    traced_reference = torch.jit.trace(reference, x, check_trace=not training)
    torch.testing.assert_close(traced(x), traced_reference(x))
    if training:
        torch.testing.assert_close(ours[1].running_mean, reference[1].running_mean)


@pytest.mark.parametrize("cls,extra", [
    (batchnorm.BatchNorm2d, None), (batchnorm.BatchNormReLU2d, "relu"),
    (batchnorm.BatchNormAddReLU2d, "add_relu"), (batchnorm.BatchNorm1d, None)])
@pytest.mark.parametrize("training", [False, True])
def test_jit_script_matches_torch(cls, extra, training):
    torch.manual_seed(0)
    ours = cls(5)
    twin = (torch.nn.BatchNorm1d if cls is batchnorm.BatchNorm1d else torch.nn.BatchNorm2d)(5)
    twin.load_state_dict(ours.state_dict())
    ours.train(training)
    twin.train(training)
    scripted = torch.jit.script(ours)
    x = torch.randn(4, 5) if cls is batchnorm.BatchNorm1d else torch.randn(4, 5, 3, 3)
    residual = torch.randn_like(x)
    if extra == "add_relu":
        got, want = scripted(x, residual), torch.relu(twin(x) + residual)
    else:
        got = scripted(x)
        want = torch.relu(twin(x)) if extra == "relu" else twin(x)
    torch.testing.assert_close(got, want)
    if training:  # the scripted module shares our layer's buffers
        torch.testing.assert_close(ours.running_mean, twin.running_mean)


def test_jit_script_of_a_class_without_torch_twin_names_the_way_out():
    ghost = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)
    with pytest.raises(RuntimeError, match="batchnorm.to_torch"):
        torch.jit.script(ghost)


@pytest.mark.slow
def test_compiled_converted_model_matches_compiled_torch_nn():
    """Inductor on both models: three training steps (outputs, input and parameter gradients,
    every buffer), then eval, in float64."""
    torch._dynamo.reset()
    reference = _model()[0].double().train()
    ours = batchnorm.convert(_model()[0].double().train())
    compiled_ref, compiled_ours = torch.compile(reference), torch.compile(ours)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64) * (1 + step)
        x.requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_ref, y_ours = compiled_ref(x), compiled_ours(x2)
        torch.testing.assert_close(y_ours, y_ref)
        y_ref.square().sum().backward()
        y_ours.square().sum().backward()
        torch.testing.assert_close(x2.grad, x.grad)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(reference.named_buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=name)
    assert reference[1].num_batches_tracked.item() == 1 + 3  # _model's batch, then ours
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(compiled_ours.eval()(x), compiled_ref.eval()(x))
