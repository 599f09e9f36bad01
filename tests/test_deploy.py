"""Folding inference-affine norms into their feeders, torch.export and ONNX export, the CLI."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autonorm
from autonorm import NormConfig, apply_config, deploy, fold_norms
from autonorm.callbacks import AutoNorm
from autonorm.cli import main
from autonorm.deploy import export_onnx, export_program, plan_folds
from autonorm.norms import FrozenBatchNorm, create_norm
from tests import models
from tests.lightning_models import tiny_trainer

USER_MODULE = (Path(__file__).parent / "user_project" / "usermodels.py").read_text()


def _trained_stats(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random affine and running statistics away from their initial values, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        model.train()
        for _ in range(3):
            model(x + torch.randn(x.shape, generator=gen))
    return model.eval()


def _folded_equal(model: nn.Module, x: torch.Tensor) -> list[deploy.Fold]:
    with torch.no_grad():
        expected = model(x)
        fold_norms(model, x)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return model.autonorm_folds


@pytest.mark.parametrize("build", [models.resnet, models.mlp, models.conv1d_net])
def test_batchnorms_fold_into_their_feeders_with_the_same_output(build):
    model, x = build()
    _trained_stats(model, x)
    slots = [
        name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    ]
    folds = _folded_equal(model, x)
    assert {f.slot for f in folds if f.reason is None} == set(slots)
    for name in slots:
        assert isinstance(model.get_submodule(name), nn.Identity)


class TokenNet(nn.Module):
    """Linear -> batch norm over tokens, ConvTranspose -> frozen BN, conv+ws -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6, bias=False)
        self.bn_tokens = create_norm("batchnorm", 6, layout="channels_last")
        self.up = nn.ConvTranspose1d(6, 4, 2, stride=2)
        self.frozen = FrozenBatchNorm(4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_tokens(self.proj(x)).transpose(1, 2)
        return self.bn(self.conv(torch.relu(self.frozen(self.up(h)))))


def test_layout_variants_frozen_batchnorm_conv_transpose_and_ws_fold():
    model, x = TokenNet(), torch.randn(3, 7, 5)
    apply_config(model, {"bn": "batchnorm(affine=false)+ws"}, partial=True, example_input=x)
    with torch.no_grad():
        model.frozen.running_mean.uniform_(-1, 1)
        model.frozen.running_var.uniform_(0.5, 2)
        model.frozen.weight.uniform_(0.5, 2)
    _trained_stats(model, x)
    folds = _folded_equal(model, x)
    assert [f.reason for f in folds] == [None, None, None]
    assert not torch.nn.utils.parametrize.is_parametrized(model.conv)  # ws baked in


class ReadTwice(nn.Module):
    """The conv's output feeds the BN and the residual add: folding would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn2(self.conv2(self.bn(h) + h))


def test_a_fold_that_changes_the_output_is_undone():
    model, x = ReadTwice(), torch.randn(2, 3, 4, 4)
    _trained_stats(model, x)
    folds = {f.slot: f for f in _folded_equal(model, x)}
    assert "read elsewhere" in folds["bn"].reason
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (models.unet, "groupnorm depends on the input"),
        (models.fused_norm_net, "fused subclass"),
        (models.shared_norm_net, "shared with"),
    ],
)
def test_norms_that_cannot_fold_stay_and_say_why(build, reason):
    model, x = build()
    _trained_stats(model, x)
    folds = _folded_equal(model, x)
    assert folds and all(reason in (f.reason or "") for f in folds)


def _with_statistics(*norms: nn.Module) -> None:
    for norm in norms:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2.0)


def test_a_linear_folds_into_a_batchnorm1d_only_where_a_probe_saw_a_2d_input():
    def build():
        torch.manual_seed(0)  # the same weights and statistics each time
        model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).eval()
        _with_statistics(model[1])
        return model

    tokens = torch.linspace(-2, 2, 4 * 8 * 16).reshape(4, 8, 16)  # (N, C, L): Linear on L
    expected = build()(tokens)
    unprobed = fold_norms(build())  # no example input: nothing proves the axes agree
    assert isinstance(unprobed[1], nn.BatchNorm1d)
    assert "no probe saw" in unprobed.autonorm_folds[0].reason
    assert torch.equal(unprobed(tokens), expected)
    probed = fold_norms(build(), tokens)
    assert isinstance(probed[1], nn.BatchNorm1d)
    assert "last dimension of its 3-D output" in probed.autonorm_folds[0].reason
    features = torch.linspace(-2, 2, 4 * 16).reshape(4, 16)
    flat = build()
    before = flat(features)
    folded = fold_norms(flat, features)
    assert isinstance(folded[1], nn.Identity)
    assert torch.allclose(folded(features), before, atol=1e-5)


def test_a_fold_that_fails_part_way_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):  # the hook-based weight_norm torch deprecates
        hooked = nn.utils.weight_norm(nn.Conv2d(8, 8, 3))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), hooked, nn.BatchNorm2d(8)
    )
    _with_statistics(model[1], model[4])
    model.train()
    types = [type(m) for m in model]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(autonorm.AutoNormError, match="the model is unchanged"):
        fold_norms(model, x)
    assert [type(m) for m in model] == types and model[3] is hooked
    assert model.training  # its mode too
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(model, "autonorm_folds")


def test_batchnorm_without_running_stats_and_switchable_are_not_folded():
    model, x = models.resnet()
    apply_config(
        model,
        {"bn1": "batchnorm(track_running_stats=false)", "layer1.0.bn1": "switchable"},
        partial=True,
        example_input=x,
    )
    _trained_stats(model, x)
    reasons = {f.slot: f.reason for f in plan_folds(model, x)}
    assert "depends on the input" in reasons["bn1"]
    assert "depends on the input" in reasons["layer1.0.bn1"]
    assert reasons["layer1.0.bn2"] is None


def _exported_resnet() -> tuple[nn.Module, torch.Tensor]:
    model, x = models.resnet()
    config = {"bn1": "switchable", "layer1.0.bn1": "groupnorm(groups=2)+ws", "layer2.0.bn1": "dyt"}
    apply_config(model, config, partial=True, example_input=x)
    _trained_stats(model, x)
    return fold_norms(model, x), x


def test_torch_export_program_round_trip(tmp_path):
    model, x = _exported_resnet()
    path = export_program(model, x, tmp_path / "model.pt2")
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    model, x = _exported_resnet()
    path = export_onnx(model, x, tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    except ImportError:  # the reference evaluator needs nothing but onnx
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        got = evaluator.run(None, {evaluator.input_names[0]: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def test_doctests():
    assert doctest.testmod(deploy, verbose=False).failed == 0
    assert autonorm.fold_norms is fold_norms


@pytest.fixture()
def user_project(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("usermodels", None)


@pytest.mark.slow
def test_cli_export_folds_a_trained_checkpoint(user_project, capsys):
    import usermodels

    model = usermodels.Net()
    callback = AutoNorm(config=NormConfig({"bn": "batchnorm+ws", "norm": "layernorm"}))
    trainer = tiny_trainer(user_project, [callback], max_epochs=1)
    trainer.fit(model, datamodule=usermodels.Data())
    trainer.save_checkpoint(user_project / "net.ckpt")
    args = ["export", "usermodels.Net", "--checkpoint", "net.ckpt", "-o", "net.pt2"]
    assert main([*args, "--onnx", "net.onnx"]) == 0
    printed = capsys.readouterr().out
    assert "bn" in printed and "conv" in printed and "layernorm depends on the input" in printed
    assert "norms folded for inference" in printed
    assert "max |difference| from the model in onnxruntime" in printed  # the ONNX file checked
    folded = torch.export.load(user_project / "net.pt2").module()
    reference = autonorm.load_from_checkpoint(usermodels.Net, user_project / "net.ckpt").eval()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(user_project / "net.onnx"))
    for batch in (4, 2, 7):  # the batch dimension is dynamic in both files
        x = torch.randn(batch, 2, 16)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), reference(x), rtol=0, atol=1e-5)
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), reference(x), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in user_project.glob("net.onnx*")) == ["net.onnx"]  # no side file
    # --no-fold says so; a model without a checkpoint is exported only with --untrained
    assert main([*args, "--no-fold"]) == 0
    printed = capsys.readouterr().out
    assert "--no-fold" in printed and "norms folded" not in printed
    assert main(["export", "usermodels.Net", "-o", "init.pt2"]) == 2
    assert "no --checkpoint: the model would be exported with untrained weights" in (
        capsys.readouterr().err
    )
    assert main(["export", "usermodels.Net", "-o", "init.pt2", "--untrained"]) == 0


def test_cli_export_refuses_a_wrong_output_suffix(user_project, capsys):
    assert main(["export", "usermodels.Net", "-o", "net.onnx"]) == 2
    assert "-o/--output must be a .pt2 file" in capsys.readouterr().err


def test_inference_cost_of_a_config_and_its_folded_total():
    from autonorm.report._cost import cost_table_html, inference_cost

    slots = [
        {"name": "bn1", "num_features": 8, "layout": "channels_first", "input_shape": [4, 8, 6, 6], "feeder": "conv1"},
        {"name": "bn2", "num_features": 8, "layout": "channels_first", "input_shape": [4, 8, 6, 6], "feeder": None},
        {"name": "ln", "num_features": 8, "layout": "channels_last", "input_shape": [4, 5, 8], "feeder": "fc"},
        {"name": "unprobed", "num_features": 8, "layout": "channels_first"},
    ]  # fmt: skip
    config = {
        "bn1": "batchnorm",
        "bn2": "batchnorm",
        "ln": "groupnorm(groups=2)",
        "unprobed": "dyt",
    }
    cost = inference_cost(slots, config, reps=2)
    assert set(cost["slots"]) == {"bn1", "bn2", "ln"}  # no input shape: not timed
    assert [cost["slots"][s]["folds"] for s in ("bn1", "bn2", "ln")] == [True, False, False]
    assert all(c["ms"] > 0 for c in cost["slots"].values())
    assert cost["total_ms"] == pytest.approx(sum(c["ms"] for c in cost["slots"].values()))
    assert cost["folded_total_ms"] == pytest.approx(cost["total_ms"] - cost["slots"]["bn1"]["ms"])
    assert "groupnorm(groups=2)" in cost_table_html(
        cost
    ) and "folds into its feeder" in cost_table_html(cost)
    assert inference_cost(slots[3:], config) is None and cost_table_html(None) == ""


def test_the_bundle_summary_and_report_show_the_inference_cost(tmp_path):
    from autonorm._trial_keys import STUDY_INFO
    from autonorm.report import write_report
    from autonorm.report._summary import write_summary
    from tests.report.studies import SLOTS, make_study, params

    plans = [(params("batchnorm", "layernorm", "batchnorm"), {})]
    study = make_study(tmp_path, plans)
    info = dict(study.user_attrs[STUDY_INFO])
    for slot in info["slots"]:
        slot.update(input_shape=[2, 8, 4, 4], feeder=f"{slot['name']}_conv")
    study.set_user_attr(STUDY_INFO, info)
    summary = write_summary(study, tmp_path)
    cost = summary["inference_cost"]
    assert set(cost["slots"]) == set(SLOTS)
    assert cost["folded_total_ms"] == pytest.approx(
        cost["slots"][SLOTS[1]]["ms"]
    )  # layernorm stays
    html = write_report(study, tmp_path / "report.html", summary=summary).read_text()
    assert "Inference cost of the chosen norms" in html and "folds into its feeder" in html


@pytest.mark.slow
def test_a_search_bundle_records_the_best_configs_inference_cost(tmp_path):
    import json

    from tests.lightning_models import TinyConvNet, TinyDataModule

    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        n_trials=2,
        trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "run",
        seed=0,
        space="minimal",
    )
    summary = json.loads((result.out_dir / "summary.json").read_text())
    cost = summary["inference_cost"]
    assert set(cost["slots"]) == set(result.best_config.choices)
    for name, choice in result.best_config.choices.items():
        assert cost["slots"][name]["choice"] == choice.label and cost["slots"][name]["ms"] > 0
    assert cost["folded_total_ms"] <= cost["total_ms"]
    assert "Inference cost of the chosen norms" in (result.out_dir / "report.html").read_text()
