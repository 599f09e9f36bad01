"""The rules of :mod:`autonorm.deploy` that the round-trip tests take for granted: each reason a
slot does not fold (word for word: the export prints them), a batch norm switched to batch
statistics, a frozen feeder, a given plan, the check's default tolerance, a fold that fails, the
log line, and the exports' handling of several inputs and outputs (``torch.export``, ONNX and
onnxruntime's difference)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from autonorm import AutoNormError, fold_norms
from autonorm.deploy import (
    FOLDS_ATTR,
    Fold,
    export_onnx,
    export_program,
    fold_into,
    inference_affine,
    onnx_difference,
    plan_folds,
)


def _with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine weights away from their initial values; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 2.0, generator=gen)
                m.bias.uniform_(-1, 1, generator=gen)
    return model.eval()


def reasons(model: nn.Module, example_input=None) -> dict[str, str | None]:
    return {f.slot: f.reason for f in plan_folds(model, example_input)}


# -- why a slot does not fold -----------------------------------------------------------------


def test_a_batch_norm_nothing_feeds_says_so_and_stays():
    model = _with_statistics(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    assert reasons(model, x) == {"0": "no Conv/Linear layer feeds it alone"}
    expected = model(x)
    fold_norms(model, x)
    assert isinstance(model[0], nn.BatchNorm1d)
    assert torch.equal(model(x), expected)


class FusedBatchNorm(nn.BatchNorm2d):
    """A batch norm subclass that also activates (as timm's ``BatchNormAct2d`` does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_the_reasons_are_given_word_for_word():
    x = torch.randn(2, 3, 5, 5)
    fused = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), FusedBatchNorm(4)))
    assert reasons(fused, x)["1"] == "its layer does more than normalize (a fused subclass)"
    grouped = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)).eval()
    assert reasons(grouped, x)["1"] == "groupnorm depends on the input at inference"
    linear = _with_statistics(nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)))
    assert reasons(linear)["1"] == (
        "a Linear feeds a channels-first batch norm: the same channels only on a 2-D input, "
        "which no probe saw (give example_input)"
    )
    assert reasons(linear, torch.randn(2, 8, 16))["1"] == (
        "a Linear's features are the last dimension of its 3-D output, the batch norm's "
        "channels its second"
    )


def test_a_batch_norm_switched_to_batch_statistics_after_training_does_not_fold():
    """``track_running_stats = False`` on a trained batch norm (kept running statistics): in
    eval mode it normalizes with each batch's own statistics, which no feeder can hold."""
    model = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model[1].track_running_stats = False
    assert model[1].running_mean is not None
    assert inference_affine(model[1]) is None
    x = torch.randn(2, 3, 5, 5)
    assert reasons(model, x)["1"] == "batchnorm depends on the input at inference"


class BareFrozen(nn.Module):
    """A frozen batch norm look-alike with statistics and eps only (no weight, no bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.eps = 1e-3
        self.register_buffer("running_mean", torch.linspace(-1, 1, channels))
        self.register_buffer("running_var", torch.linspace(0.5, 2, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = (self.running_var + self.eps).rsqrt()
        return (x - self.running_mean.view(shape)) * scale.view(shape)


def test_the_inference_affine_map_is_in_float64_also_without_weight_or_bias():
    frozen = BareFrozen(4)
    scale, shift = inference_affine(frozen)
    assert scale.dtype == shift.dtype == torch.float64
    expected = (frozen.running_var.double() + 1e-3).rsqrt()
    torch.testing.assert_close(scale, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(shift, -frozen.running_mean.double() * expected, rtol=1e-12, atol=0)
    x = torch.randn(2, 4, 3, 3)
    mapped = x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(mapped.float(), frozen(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "norm", [nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm2d(4), nn.Identity()]
)
def test_norms_whose_eval_output_depends_on_the_input_have_no_affine_map(norm):
    assert inference_affine(norm) is None


# -- folding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("feeder", [nn.Conv2d(3, 4, 1), nn.Linear(3, 4)])
def test_a_frozen_feeder_stays_frozen_once_folded(feeder):
    feeder.requires_grad_(False)
    norm = _with_statistics(nn.BatchNorm1d(4))
    folded = fold_into(feeder, *inference_affine(norm))
    assert not folded.weight.requires_grad and not folded.bias.requires_grad
    trainable = fold_into(feeder.requires_grad_(True), *inference_affine(norm))
    assert trainable.weight.requires_grad and trainable.bias.requires_grad


def test_only_the_folds_of_a_given_plan_are_made():
    model = _with_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    )
    x = torch.randn(2, 3, 5, 5)
    chosen = [f for f in plan_folds(model, x) if f.slot == "3"]
    fold_norms(model, x, plan=chosen)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.Identity)
    assert getattr(model, FOLDS_ATTR) == chosen


class ReadTwice(nn.Module):
    """The conv's output feeds the batch norm and, scaled down, the output (offset from 0): a
    fold changes the output by well under 1% of its size, still far above the check's default
    tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn(h) + 0.05 * h + 10.0


def test_a_fold_that_changes_the_output_by_a_fraction_of_a_percent_is_undone_and_named(caplog):
    model = _with_statistics(ReadTwice())
    x = torch.randn(2, 3, 5, 5)
    caplog.set_level(logging.INFO, logger="autonorm.deploy")
    expected = model(x)
    fold_norms(model, x)
    assert getattr(model, FOLDS_ATTR) == [
        Fold("bn", "conv", "folding changes the output: the feeder's output is read elsewhere too")
    ]
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.equal(model(x), expected)
    assert [r.getMessage() for r in caplog.records if r.name == "autonorm.deploy"] == [
        "folded 0 of 1 norm slots"
    ]


def test_the_model_s_example_input_array_checks_the_folds():
    model = _with_statistics(ReadTwice())
    model.example_input_array = torch.randn(2, 3, 5, 5)
    fold_norms(model)
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert "read elsewhere" in getattr(model, FOLDS_ATTR)[0].reason


def test_a_fold_that_cannot_be_made_names_the_slot_and_feeder_and_changes_nothing():
    """A plan pairing a batch norm with a feeder of another width (a stale plan)."""
    model = _with_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
    )
    before = [type(m) for m in model]
    with pytest.raises(AutoNormError, match=r"^cannot fold 3 into 0: ") as err:
        fold_norms(model, torch.randn(2, 3, 5, 5), plan=[Fold("3", "0")])
    assert "fold_norms failed" not in str(err.value)
    assert [type(m) for m in model] == before


# -- exports with several inputs and outputs ---------------------------------------------------


class ScaledTwoOutputs(nn.Module):
    """``forward(x, scale)`` with a 0-d tensor scale; returns two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x) * scale
        return h, h.mean((2, 3))


def test_a_program_takes_a_0d_tensor_argument_and_any_batch(tmp_path):
    model = ScaledTwoOutputs().eval()
    x, scale = torch.randn(2, 3, 4, 4), torch.tensor(1.5)
    loaded = torch.export.load(export_program(model, (x, scale), tmp_path / "m.pt2")).module()
    other = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other, scale), model(other, scale))


def test_a_program_takes_keyword_inputs_with_any_batch(tmp_path):
    model = ScaledTwoOutputs().eval()
    named = {"x": torch.randn(2, 3, 4, 4), "scale": torch.tensor(1.5)}
    loaded = torch.export.load(export_program(model, named, tmp_path / "m.pt2")).module()
    other = {"x": torch.randn(5, 3, 4, 4), "scale": torch.tensor(0.5)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**other), model(**other))


@pytest.mark.slow
def test_onnx_of_keyword_inputs_and_two_outputs_is_one_file_and_its_difference_is_measured(
    tmp_path, capsys
):
    pytest.importorskip("onnxruntime")
    model = ScaledTwoOutputs().eval()
    named = {"x": torch.randn(2, 3, 4, 4), "scale": torch.tensor(1.5)}
    capsys.readouterr()
    path = export_onnx(model, named, tmp_path / "m.onnx")
    assert capsys.readouterr().out == ""  # not verbose
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # the weights inside
    assert onnx_difference(path, model, named) < 1e-5
    with torch.no_grad():
        expected = model(**named)
        model.conv.bias.add_(1.0)  # the file now differs by 1.5 (the bias, scaled) everywhere
        changed = model(**named)
    gap = max(float((a - b).abs().max()) for a, b in zip(changed, expected, strict=True))
    assert onnx_difference(path, model, named) == pytest.approx(gap, abs=1e-4)
    assert gap == pytest.approx(1.5, abs=1e-4)
