"""SyncBatchNorm: 2 and 3 processes over gloo on loopback against one process on the whole batch.

Each spawned process imports torch (seconds), so one spawn runs many checks: every worker
builds the same data from one seed, computes the single-process reference (torch.nn batch norm
in float64 on the concatenated batch) itself, and compares its own slice. An assertion in any
worker fails the test (torch.multiprocessing.spawn re-raises it and stops the other workers).
"""

import copy
import os
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchnorm
from batchnorm import family
from batchnorm.distributed import SyncBatchNorm, combine_moments
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _reference_cls(dim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[dim]


# ---------------------------------------------------------------------------------------------
# Checks run inside each worker
# ---------------------------------------------------------------------------------------------


def check_against_concatenated(rank, world, group, sizes, tail=(5, 5), dtype=torch.float32,
                               channels_last=False, affine=True, momentum=0.1, relu=False,
                               steps=3, channels=3):
    """3 training steps and one eval step: outputs, input grads, summed parameter grads,
    running statistics, all equal to one process normalizing the concatenated batch."""
    assert len(sizes) == world
    gen = torch.Generator().manual_seed(1234 + sum(sizes))
    total, start = sum(sizes), sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    C, f64 = channels, torch.float64
    reference = _reference_cls(2 + len(tail))(C, momentum=momentum, affine=affine, dtype=f64)
    ours = SyncBatchNorm(C, momentum=momentum, affine=affine, relu=relu, dtype=dtype,
                         process_group=group)
    if affine:
        with torch.no_grad():
            reference.weight.copy_(torch.rand(C, generator=gen, dtype=f64) + 0.5)
            reference.bias.copy_(torch.randn(C, generator=gen, dtype=f64))
            ours.weight.copy_(reference.weight)
            ours.bias.copy_(reference.bias)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    what = f"rank {rank} of sizes {sizes}, tail {tail}, {dtype}"

    for step in range(steps):
        assert ours._sync() is not None, "training with world size > 1 must synchronize"
        x_full = torch.randn(total, C, *tail, generator=gen, dtype=f64) * 2 + 3
        dy_full = torch.randn(total, C, *tail, generator=gen, dtype=f64)
        x_ref = x_full.clone().requires_grad_()
        y_ref = reference(x_ref)
        if relu:
            y_ref = torch.relu(y_ref)
        (y_ref * dy_full).sum().backward()

        x = x_full[rows].to(dtype).contiguous(memory_format=layout).requires_grad_()
        y = ours(x)
        (y * dy_full[rows].to(dtype)).sum().backward()

        here = f"{what}, step {step}"
        if channels_last and x.numel():
            assert y.is_contiguous(memory_format=torch.channels_last), f"{here}: layout lost"
        assert y.dtype == dtype and y.shape == x.shape, here
        assert_close(y, y_ref[rows], dtype, 256, f"{here}: output")
        assert_close(x.grad, x_ref.grad[rows], dtype, 256, f"{here}: input grad")
        if affine:
            for name in ("weight", "bias"):
                mine, theirs = getattr(ours, name), getattr(reference, name)
                summed = mine.grad.clone()
                dist.all_reduce(summed, group=group)  # as DDP (which then divides by world size)
                assert_close(summed, theirs.grad, dtype, 256, f"{here}: {name} grad (summed)")
                with torch.no_grad():  # an SGD step, so the next step sees new parameters
                    mine -= 0.1 * summed
                    theirs -= 0.1 * theirs.grad
                mine.grad, theirs.grad = None, None
        assert_close(ours.running_mean, reference.running_mean, dtype, 256, f"{here}: running_mean")
        assert_close(ours.running_var, reference.running_var, dtype, 256, f"{here}: running_var")
        assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1

    ours.eval()
    reference.eval()
    assert ours._sync() is None, "evaluation mode must take the local path"
    x_full = torch.randn(total, C, *tail, generator=gen, dtype=f64)
    y_ref = reference(x_full)
    if relu:
        y_ref = torch.relu(y_ref)
    assert_close(ours(x_full[rows].to(dtype)), y_ref[rows], dtype, 256, f"{what}: eval output")


def check_too_few_values(rank, world, group, sizes):
    """A global batch of one value per channel is rejected on every rank (none waits)."""
    ours = SyncBatchNorm(2, process_group=group)
    x = torch.randn(sizes[rank], 2)
    try:
        ours(x)
    except ValueError as error:
        assert "more than 1 value per channel over all processes" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: a global batch of {sum(sizes)} values was accepted")
    dist.barrier(group=group)  # every rank got here: nobody is stuck in a collective


def _small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), batchnorm.BatchNormReLU2d(8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def check_ddp_training(rank, world, group, sizes, steps=3):
    """DDP + SyncBatchNorm on `world` ranks trains like one process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    reference = _small_cnn().double()  # the same initial weights on every rank (same seed)
    model = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference), group)
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 2
    ddp = DistributedDataParallel(model, process_group=group)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    total, start = sum(sizes), sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    f64 = torch.float64
    for step in range(steps):
        x = torch.randn(total, 3, 8, 8, generator=gen, dtype=f64)
        labels = torch.randint(0, 4, (total,), generator=gen)
        loss_ref = torch.nn.functional.cross_entropy(reference(x), labels)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        # DDP averages gradients over ranks: scale this rank's share of the mean loss by world
        loss = torch.nn.functional.cross_entropy(ddp(x[rows]), labels[rows], reduction="sum")
        opt.zero_grad()
        (loss * world / total).backward()
        opt.step()
        summed = loss.detach().clone()
        dist.all_reduce(summed, group=group)
        assert_close(summed / total, loss_ref.detach(), f64, 256, f"rank {rank} step {step}: loss")
        for (name, mine), theirs in zip(model.state_dict().items(),
                                        reference.state_dict().values(), strict=True):
            assert_close(mine, theirs, f64, 256, f"rank {rank} step {step}: {name}")


CHECKS = {
    "concatenated": check_against_concatenated,
    "too_few_values": check_too_few_values,
    "ddp": check_ddp_training,
}


def _worker(rank, world, rendezvous, checks):
    """Run each check on the processes of its group: (name, ranks, kwargs); ranks None: all."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        groups = {}
        for _, ranks, _ in checks:  # every process must take part in creating every group
            if ranks is not None and ranks not in groups:
                groups[ranks] = dist.new_group(list(ranks))
        for name, ranks, kwargs in checks:
            members = range(world) if ranks is None else ranks
            if rank in members:
                CHECKS[name](list(members).index(rank), len(members), groups.get(ranks),
                             **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path, checks):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), checks), nprocs=world,
             join=True)


# ---------------------------------------------------------------------------------------------
# Multi-process test: one spawn of 3 processes (each costs a torch import). The 3-process
# checks use the default group; the 2-process checks run on ranks (0, 1) through a 2-member
# process_group (SyncBatchNorm's and DDP's), while rank 2 waits at the final barrier.
# ---------------------------------------------------------------------------------------------

PAIR = (0, 1)


@pytest.mark.slow
def test_two_and_three_processes(tmp_path):
    _spawn(3, tmp_path, [
        # 3 processes
        ("concatenated", None, dict(sizes=(2, 0, 5))),
        ("concatenated", None, dict(sizes=(3, 3, 3), tail=(2, 3, 3), dtype=torch.float64)),
        ("concatenated", None, dict(sizes=(0, 0, 4), tail=(), dtype=torch.float64, channels=1)),
        ("too_few_values", None, dict(sizes=(0, 1, 0))),
        # 2 processes
        ("concatenated", PAIR, dict(sizes=(4, 4))),
        ("concatenated", PAIR, dict(sizes=(5, 2), channels_last=True, relu=True)),
        ("concatenated", PAIR, dict(sizes=(3, 0), tail=(7,), dtype=torch.float64,
                                    momentum=None)),
        ("concatenated", PAIR, dict(sizes=(1, 2), tail=(), affine=False, channels=5)),
        ("concatenated", PAIR, dict(sizes=(2, 3), tail=(3, 3), dtype=torch.bfloat16)),
        ("too_few_values", PAIR, dict(sizes=(1, 0))),
        ("ddp", PAIR, dict(sizes=(5, 3))),
    ])


# ---------------------------------------------------------------------------------------------
# Single-process tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(4, 4), (7, 1, 2), (5, 0, 3), (0, 6), (1, 1, 1, 1)])
def test_combine_moments_equals_concatenated_batch(sizes):
    rng = np.random.default_rng(0)
    parts = [rng.normal(1e4, 1.0, size=(n, 3)) for n in sizes]  # |mean| >> std: cancellation
    rows = [(n, p.mean(0) if n else np.zeros(3), ((p - p.mean(0)) ** 2).sum(0) if n
             else np.zeros(3)) for n, p in zip(sizes, parts, strict=True)]
    counts = torch.tensor([[float(n)] for n, _, _ in rows], dtype=torch.float64)
    means = torch.tensor(np.stack([m for _, m, _ in rows]))
    m2s = torch.tensor(np.stack([s for _, _, s in rows]))
    count, mean, m2 = combine_moments(counts, means, m2s)
    whole = np.concatenate(parts)
    assert float(count) == whole.shape[0]
    np.testing.assert_allclose(mean.numpy(), whole.mean(0), rtol=1e-14)
    np.testing.assert_allclose(m2.numpy(), ((whole - whole.mean(0)) ** 2).sum(0), rtol=1e-9)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (6, 3, 4, 4), (4, 3, 2, 3, 3)])
def test_without_process_group_equals_batchnorm(shape):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    reference = _reference_cls(len(shape))(3, dtype=torch.float64)
    ours = SyncBatchNorm(3, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1
        x_ref = x.clone().requires_grad_()
        x.requires_grad_()
        ours(x).square().sum().backward()
        reference(x_ref).square().sum().backward()
        assert_close(x.grad, x_ref.grad, torch.float64, 256, "input grad")
        assert_close(ours.weight.grad, reference.weight.grad, torch.float64, 256, "weight grad")
    assert_close(ours.running_var, reference.running_var, torch.float64, 256, "running_var")
    ours.eval(), reference.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert_close(ours(x), reference(x), torch.float64, 256, "eval output")


def test_world_size_one_takes_local_path(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        ours = SyncBatchNorm(3)
        assert ours._sync() is None
        x = torch.randn(5, 3, 2, 2)
        assert_close(ours(x), torch.nn.BatchNorm2d(3)(x), torch.float32, 256, "world size 1")
        ours.process_group = dist.new_group([0])
        assert ours._sync() is None
    finally:
        dist.destroy_process_group()


def test_rejects_bad_input():
    ours = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ours(torch.randn(3))
    with pytest.raises(RuntimeError, match="expects 3 channels in dim 1"):
        ours(torch.randn(4, 5, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3))  # no process group: the single-process check


def test_convert_sync_batchnorm_keeps_state_and_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), torch.nn.Sequential(torch.nn.BatchNorm2d(4)),
        torch.nn.BatchNorm3d(2), batchnorm.BatchNorm2d(4, affine=False),
        batchnorm.BatchNormReLU2d(4), torch.nn.SyncBatchNorm(4),
        family.GhostBatchNorm2d(4, virtual_batch_size=2), family.BatchRenorm2d(4),
    )
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-1, 1)
            bn.num_batches_tracked.fill_(5)
    before = {id(m): (m.weight, m.running_mean) for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    inner = model[1]
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group="group-token")
    assert converted is model and model[1] is inner
    for index in range(6):
        layer = model[index][0] if index == 1 else model[index]
        assert type(layer) is SyncBatchNorm, f"layer {index} not converted"
        assert layer.process_group == "group-token"
        assert int(layer.num_batches_tracked) == 5
    assert model[4].relu and not model[0].relu
    assert type(model[6]) is family.GhostBatchNorm2d and type(model[7]) is family.BatchRenorm2d
    weights = [m.weight for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert all(any(w is old[0] for old in before.values()) for w in weights)  # same objects
    single = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(4).eval())
    assert type(single) is SyncBatchNorm and not single.training
    with pytest.raises(ValueError, match="has not seen an input yet"):
        SyncBatchNorm.convert_sync_batchnorm(batchnorm.LazyBatchNorm2d())


def test_converted_fused_layer_computes_the_same():
    torch.manual_seed(0)
    fused = batchnorm.BatchNormReLU2d(4)
    x = torch.randn(6, 4, 3, 3)
    expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    synced = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert_close(synced(x), expected, torch.float32, 256, "fused ReLU kept")


def test_converted_add_relu_layer_still_takes_its_residual():
    torch.manual_seed(0)
    fused = batchnorm.BatchNormAddReLU2d(4)
    x, residual = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True) + residual)
    synced = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert_close(synced(x, residual), expected, torch.float32, 256, "residual add and ReLU kept")
