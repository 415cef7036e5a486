"""`batchnorm inspect | fold | strip-bias` end to end, through the dispatcher."""

import torch
from torch import nn

from batchnorm.cli import main
from batchnorm.tools import fold_bn, strip_redundant_biases
from tests.zoo import ZOO


def model_only():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def untraceable():
    return nn.Sequential(nn.Conv2d(3, 4, 3), _Branchy(), nn.BatchNorm2d(4)), torch.randn(2, 3, 6, 6)


def test_inspect_prints_the_bn_table_and_savings(capsys):
    assert main(["inspect", "tests.zoo:mobilenet_v2"]) == 0
    out = capsys.readouterr().out
    assert "3.depthwise.1" in out and "into previous 3.depthwise.0" in out
    assert "7 BN layers; 6 redundant biases; 7 foldable" in out
    assert "strip-bias saves 144" in out


def test_inspect_shows_biases_found_through_cat_and_add(capsys):
    assert main(["inspect", "tests.zoo:inception_block"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("bn "))
    assert "branch1, branch3.3, branch_pool.1" in row
    assert "redundant through cat: branch3.3.bias -> bn channels 4:10 of 16" in out
    assert "biases kept: branch_relu.0: branch_relu.1 (ReLU)" in out
    assert main(["inspect", "tests.zoo:sum_merge"]) == 0
    out = capsys.readouterr().out
    assert "redundant through sub, mul: right.bias -> diff_bn channels 0:8 of 8" in out
    assert "5 redundant biases" in out and "strip-bias saves 40" in out


def test_inspect_with_checkpoint_and_input_shape(tmp_path, capsys):
    model = model_only()
    with torch.no_grad():
        model[1].num_batches_tracked.fill_(42)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    assert main(["inspect", "tests.test_tools_cli:model_only", "--checkpoint", str(path),
                 "--input-shape", "2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert " 42 " in out and "1 redundant biases" in out


def test_fold_and_strip_write_loadable_state(tmp_path, capsys):
    torch.manual_seed(0)
    model, x = ZOO["unet_decoder"]()
    for command, tool in (("fold", fold_bn), ("strip-bias", strip_redundant_biases)):
        out = tmp_path / f"{command}.pt"
        torch.manual_seed(0)  # the factory builds the same model as above
        assert main([command, "tests.zoo:unet_decoder", "--out", str(out)]) == 0
        assert "max output difference" in capsys.readouterr().out
        structure, _ = tool(ZOO["unet_decoder"]()[0], x)
        structure.load_state_dict(torch.load(out, weights_only=True))
        expected, _ = tool(model, x)
        structure.eval(), expected.eval()
        torch.testing.assert_close(structure(*x), expected(*x))


def test_errors_are_clear(capsys):
    assert main(["inspect", "tests.test_tools_cli:model_only"]) == 1
    assert "--input-shape" in capsys.readouterr().err
    assert main(["inspect", "tests.test_tools_cli:untraceable"]) == 1
    err = capsys.readouterr().err
    assert "could not trace" in err and "_Branchy" in err
    assert main(["inspect", "no_colon"]) == 1
    assert "MODULE:FACTORY" in capsys.readouterr().err
