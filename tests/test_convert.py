"""convert() and to_torch(): what a converted layer keeps (state, hooks, attributes), which
classes convert (Lazy, SyncBatchNorm; subclasses are reported), and the NaN/Inf skip warning:
where it points, what it names, and the per-layer count."""

import warnings

import pytest
import torch

import batchnorm


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU())


def test_hooks_and_attributes_survive_convert_and_back():
    net = _net()
    bn = net[1]
    calls = []
    bn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    bn.register_forward_hook(lambda m, args, out: calls.append("forward"))
    bn.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    bn.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append("state_dict"))
    bn.my_tag = "keep me"
    report = []
    batchnorm.convert(net, report=report)
    assert type(net[1]) is batchnorm.BatchNorm2d and net[1].my_tag == "keep me"
    assert report == ["1: BatchNorm2d -> batchnorm.BatchNorm2d"]
    net(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    net.state_dict()
    assert calls == ["pre", "forward", "backward", "state_dict"]
    assert net[1].weight is bn.weight and net[1].running_mean is bn.running_mean
    batchnorm.to_torch(net)
    assert type(net[1]) is torch.nn.BatchNorm2d and net[1].my_tag == "keep me"
    calls.clear()
    net(torch.randn(2, 3, 5, 5))
    assert calls == ["pre", "forward"]


def test_lazy_and_sync_layers_convert():
    net = torch.nn.Sequential(torch.nn.LazyBatchNorm2d(), torch.nn.SyncBatchNorm(3))
    batchnorm.convert(net)
    assert type(net[0]) is batchnorm.LazyBatchNorm2d
    assert type(net[1]) is batchnorm.SyncBatchNorm
    net(torch.randn(4, 3, 2, 2))  # single process: SyncBatchNorm normalizes locally
    assert type(net[0]) is batchnorm.BatchNorm2d and net[0].num_features == 3
    batchnorm.to_torch(net)
    assert type(net[0]) is torch.nn.BatchNorm2d and type(net[1]) is torch.nn.SyncBatchNorm


def test_subclasses_are_left_and_reported():
    class MyBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = torch.nn.Sequential(MyBN(3))
    with pytest.warns(UserWarning, match=r"left these batch-norm layers.*0 \(.*MyBN\)"):
        batchnorm.convert(net)
    assert type(net[0]) is MyBN


def test_to_torch_refuses_every_fused_layer():
    for layer in (batchnorm.BatchNormReLU2d(3), batchnorm.BatchNormAddReLU2d(3)):
        with pytest.raises(TypeError, match="no torch.nn equivalent"):
            batchnorm.to_torch(torch.nn.Sequential(layer))


def test_nan_warning_points_at_the_caller_names_the_layer_and_counts():
    net = batchnorm.convert(torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                torch.nn.BatchNorm1d(4)))
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    for expected in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net(x)  # this line is where the warning must point
        (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert warning.filename == __file__, warning.filename
        assert "BatchNorm1d(4) '1'" in str(warning.message)
        assert f"skipped batches so far: {expected}" in str(warning.message)
        assert net[1].skipped_batches == expected
    assert "skipped_batches" not in net.state_dict() and int(net[1].num_batches_tracked) == 0


def test_replace_modules_visits_by_name_and_replaces_the_root():
    """The one layer-replacement walk under convert, to_torch, convert_sync_batchnorm and
    freeze_batchnorm: fn sees every module by its dotted name until it replaces one."""
    from batchnorm.nn import replace_modules

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
    seen = []

    def fn(name, module):
        seen.append(name)
        return torch.nn.Tanh() if isinstance(module, torch.nn.ReLU) else None

    assert replace_modules(net, fn) is net and type(net[1][0]) is torch.nn.Tanh
    assert seen == ["", "0", "1", "1.0"]
    root = replace_modules(net, lambda name, module: torch.nn.Identity() if name == "" else None)
    assert type(root) is torch.nn.Identity
    # a replaced module's children are not visited
    seen.clear()
    replace_modules(net, lambda name, module: seen.append(name) or (module if name else None))
    assert seen == ["", "0", "1"]  # "1" kept as it is (returned), "1.0" never seen


def test_convert_sync_batchnorm_keeps_hooks_like_convert():
    from batchnorm.distributed import SyncBatchNorm

    bn = torch.nn.BatchNorm2d(4)
    calls = []
    bn.register_forward_hook(lambda m, args, out: calls.append("forward"))
    bn.my_tag = "keep me"
    synced = SyncBatchNorm.convert_sync_batchnorm(bn, process_group="group-token")
    synced(torch.randn(2, 4, 3, 3))
    assert calls == ["forward"] and synced.my_tag == "keep me" and not synced.relu
    assert synced.process_group == "group-token" and synced.weight is bn.weight


def test_to_torch_refuses_a_sync_batchnorm_with_a_fused_relu():
    net = torch.nn.Sequential(batchnorm.SyncBatchNorm(3, relu=True))
    with pytest.raises(TypeError, match="fuses a ReLU and torch.nn.SyncBatchNorm has none"):
        batchnorm.to_torch(net)
    batchnorm.to_torch(torch.nn.Sequential(batchnorm.SyncBatchNorm(3)))  # no ReLU: converts


def _instance(cls):
    if issubclass(cls, torch.nn.modules.lazy.LazyModuleMixin):
        return cls()
    if issubclass(cls, (batchnorm.GhostBatchNorm1d, batchnorm.GhostBatchNorm2d,
                        batchnorm.GhostBatchNorm3d)):
        return cls(4, virtual_batch_size=2)
    return cls(4)


def test_one_table_lists_every_class_and_drives_both_directions():
    """Walk batchnorm.conversion.CLASSES: every batch-norm class the package exports is in it;
    a class with a torch.nn twin converts from it and back to it, state shared; a class without
    one is refused by to_torch with the table's reason."""
    from batchnorm.conversion import CLASSES

    exported = {getattr(batchnorm, name) for name in batchnorm.__all__}
    norms = {c for c in exported if isinstance(c, type) and (
        issubclass(c, torch.nn.modules.batchnorm._BatchNorm)
        or issubclass(c, batchnorm.FrozenBatchNorm))}
    listed = [ours for ours, _ in CLASSES]
    assert len(listed) == len(set(listed)) and norms <= set(listed), norms - set(listed)
    for ours, theirs in CLASSES:
        if isinstance(theirs, type):
            original = _instance(theirs)
            converted = batchnorm.convert(torch.nn.Sequential(original))[0]
            assert type(converted) is ours
            back = batchnorm.to_torch(torch.nn.Sequential(converted))[0]
            assert type(back) is theirs
            if not isinstance(original, torch.nn.modules.lazy.LazyModuleMixin):
                assert back.weight is original.weight and back.running_var is original.running_var
        else:
            with pytest.raises(TypeError, match=ours.__name__) as error:
                batchnorm.to_torch(torch.nn.Sequential(_instance(ours)))
            assert theirs in str(error.value)


def test_to_torch_refuses_subclasses_of_ours_and_swaps_nothing_when_it_refuses():
    class Tagged(batchnorm.BatchNorm2d):
        pass

    net = torch.nn.Sequential(batchnorm.BatchNorm2d(3), Tagged(3))
    with pytest.raises(TypeError, match=r"1 \(Tagged\) is a subclass of a batchnorm class"):
        batchnorm.to_torch(net)
    assert type(net[0]) is batchnorm.BatchNorm2d  # the refused call swapped nothing
    net = torch.nn.Sequential(batchnorm.BatchNorm2d(3), batchnorm.BatchNormReLU2d(3))
    with pytest.raises(TypeError, match="fuses a ReLU"):
        batchnorm.to_torch(net)
    assert type(net[0]) is batchnorm.BatchNorm2d
