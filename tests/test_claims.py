"""`batchnorm claims`: every claim holds, the command's exit status and JSON, and the checker can
say "does not hold" when the premise of a claim is broken."""

import argparse
import functools
import json

import pytest
import torch
from torch import nn

from batchnorm import claims, cli


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser, "claims")
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    args.command = "claims"
    return args


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("check", claims.CHECKS, ids=lambda check: check.__name__)
def test_each_claim_holds(check, seed):
    """Called directly, a check runs on the default kernels (C++ on CPU); run() and
    run_checks() below use the torch fallback, so both paths are covered."""
    result = check(seed=seed)
    assert result.holds, f"claim {result.number} failed: {result.measured}"
    assert result.number == claims.CHECKS.index(check) + 1
    assert result.figures and result.measured


def test_run_prints_the_table_writes_json_and_returns_zero(tmp_path, capsys):
    path = tmp_path / "claims.json"
    assert claims.run(_args(json=str(path))) == 0
    out = capsys.readouterr().out
    assert "6 of 6 claims hold" in out
    assert " NO " not in out
    record = json.loads(path.read_text())
    assert record["all_hold"] is True and record["seed"] == 0
    assert [c["number"] for c in record["claims"]] == [1, 2, 3, 4, 5, 6]
    assert all(c["holds"] for c in record["claims"])
    for c in record["claims"]:
        assert c["claim"] and c["method"] and c["measured"]
        assert all(isinstance(v, (int, float, bool)) for v in c["figures"].values())
    # the measured figures are the ones printed
    assert f"{record['claims'][1]['figures']['max_abs_error']:.1e}" in out.replace("\n", " ")


def test_cli_dispatches_to_claims(capsys):
    assert cli.main(["claims", "--seed", "3"]) == 0
    assert "seed 3" in capsys.readouterr().out


def test_figures_are_measured_not_canned():
    first, second = claims.run_checks(seed=0), claims.run_checks(seed=1)
    assert first[4].figures["fresh_max_abs_diff"] != second[4].figures["fresh_max_abs_diff"]
    assert first[1].figures["max_abs_error"] != second[1].figures["max_abs_error"]


def test_table_columns_line_up():
    lines = claims.format_table(claims.run_checks(seed=0)).splitlines()
    assert len({len(line) for line in lines}) == 1


# ----------------------------------------------------------------------------------------------
# The checker can fail


def test_claim4_does_not_hold_with_a_relu_between_layer_and_bn():
    """A ReLU between the biased layer and BN: the bias changes which values are clipped, so it
    is no longer a per-channel constant that BN subtracts out."""
    result = claims.check_bias_cancelled_in_training(seed=0, between=nn.ReLU())
    assert not result.holds
    assert result.figures["conv2d_max_abs_output_diff"] > 1e-3
    assert result.figures["conv2d_max_abs_bias_grad"] > 1e-3
    assert "ReLU" in result.method


def test_claim4_holds_with_a_per_channel_affine_between():
    """Anything that adds a per-channel constant keeps the cancellation (Identity: the claim)."""
    assert claims.check_bias_cancelled_in_training(seed=0, between=nn.Identity()).holds


def test_claim5_correction_is_what_makes_them_equal():
    result = claims.check_bias_not_cancelled_in_eval(seed=0, train_steps=3)
    assert result.figures["fresh_allclose"] is False
    assert result.figures["fresh_corrected_allclose"] is True
    # momentum 0.1 from 0: after k steps running_mean holds 1 - 0.9^k of the bias
    assert result.figures["fraction_of_bias_in_running_mean"] == pytest.approx(1 - 0.9**3,
                                                                               abs=1e-10)


def test_exit_status_is_one_when_a_claim_fails(monkeypatch, capsys, tmp_path):
    broken = functools.partial(claims.check_bias_cancelled_in_training, between=nn.ReLU())
    monkeypatch.setattr(claims, "CHECKS", claims.CHECKS[:3] + (broken,) + claims.CHECKS[4:])
    path = tmp_path / "claims.json"
    assert claims.run(_args(json=str(path))) == 1
    out = capsys.readouterr().out
    assert "5 of 6 claims hold; failed: 4" in out
    assert " NO " in out
    assert json.loads(path.read_text())["all_hold"] is False


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be 'composite' or 'auto'"):
        claims.run_checks(seed=0, backend="fastest")


def test_run_restores_torch_threads():
    before = torch.get_num_threads()
    claims.run(_args())
    assert torch.get_num_threads() == before
