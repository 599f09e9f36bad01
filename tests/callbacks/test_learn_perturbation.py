"""The learn mode's config by perturbation: validation passes on the fit's own data, each slot's
candidates forced one at a time, instead of the largest learned mixing weight."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from autonorm import AutoNormError, NormConfig, derive_config
from autonorm.callbacks import AutoNorm
from autonorm.norms import SwitchableNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer

SLOTS = ["bn1", "bn2", "head_norm"]


def _val(model: TinyConvNet, dm: TinyDataModule, metric: str) -> float:
    """``metric`` of one validation pass computed here, not by Lightning."""
    model.eval()
    x, y = dm.val_set.tensors
    with torch.no_grad():
        logits = model(x)
    if metric == "val_acc":
        return float((logits.argmax(-1) == y).float().mean())
    return float(nn.functional.cross_entropy(logits, y))


def test_learn_mode_derives_its_config_by_perturbation_on_the_fits_validation_data(tmp_path):
    torch.manual_seed(0)
    model, dm = TinyConvNet(), TinyDataModule()
    callback = AutoNorm(mode="learn")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(model, datamodule=dm)

    config = callback.config
    evidence = config.metadata["perturbation"]
    assert config.metadata["derived_by"] == "perturbation"
    assert config.learned_weights  # the learned record is kept beside the evidence
    assert set(evidence["order"]) == set(SLOTS)
    # val_loss (logged by the model, found without a monitor given) of the model as trained
    assert evidence["base"] == pytest.approx(_val(model, dm, "val_loss"), rel=1e-5)
    # each slot takes its lowest-loss candidate
    for slot in SLOTS:
        scores = evidence["slots"][slot]
        assert config.choices[slot].label == min(scores, key=scores.get)
    # the joint value is the model with every slot on its chosen candidate alone
    layers = {slot: getattr(model, slot) for slot in SLOTS}
    assert all(isinstance(layer, SwitchableNorm) for layer in layers.values())
    native = {"batchnorm": "batch", "instancenorm": "instance", "rmsnorm": "rms"}
    with_candidates = [
        layers[slot].only(native.get(config.choices[slot].name, "layer")) for slot in SLOTS
    ]
    for context in with_candidates:
        context.__enter__()
    try:
        joint = _val(model, dm, "val_loss")
    finally:
        for context in reversed(with_candidates):
            context.__exit__(None, None, None)
    assert evidence["joint"] == pytest.approx(joint, rel=1e-5)
    assert NormConfig.load(callback.resolved_config_path(trainer)) == config
    assert model.trainer is trainer  # the validation passes' own Trainer let go of the model


def test_perturbation_compares_the_checkpoint_callbacks_monitor_in_its_direction(tmp_path):
    torch.manual_seed(1)
    model, dm = TinyConvNet(), TinyDataModule()
    callback = AutoNorm(mode="learn", finalize=True)
    watch = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    trainer = tiny_trainer(tmp_path, [callback, watch], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)

    evidence = callback.config.metadata["perturbation"]
    for slot in SLOTS:
        scores = evidence["slots"][slot]
        assert all(0.0 <= v <= 1.0 for v in scores.values())  # accuracies, not losses
        best = max(scores.values())
        assert scores[callback.config.choices[slot].label] == best
    # finalize swapped in the perturbation's choices
    assert not any(isinstance(m, SwitchableNorm) for m in model.modules())
    assert callback.config.choices["head_norm"].label in evidence["slots"]["head_norm"]


def test_a_given_monitor_and_direction_are_used(tmp_path):
    torch.manual_seed(2)
    model, dm = TinyConvNet(), TinyDataModule()
    callback = AutoNorm(mode="learn", monitor="val_acc", monitor_mode="max")
    tiny_trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=dm)
    evidence = callback.config.metadata["perturbation"]
    assert evidence["base"] == pytest.approx(_val(model, dm, "val_acc"))


def test_without_validation_data_auto_follows_the_weights_and_perturbation_is_refused(tmp_path):
    dm = TinyDataModule()
    dm.setup()
    loader = dm.train_dataloader()

    model = TinyConvNet()
    callback = AutoNorm(mode="learn")
    tiny_trainer(tmp_path, [callback], max_epochs=1).fit(model, train_dataloaders=loader)
    assert "derived_by" not in callback.config.metadata
    assert callback.config == derive_config(model)

    strict = AutoNorm(mode="learn", derive="perturbation")
    with pytest.raises(AutoNormError, match="cannot run: the fit has no validation data"):
        tiny_trainer(tmp_path, [strict], max_epochs=1).fit(TinyConvNet(), train_dataloaders=loader)


def test_derive_by_weights_skips_the_validation_passes(tmp_path):
    model = TinyConvNet()
    callback = AutoNorm(mode="learn", derive="weights")
    tiny_trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=TinyDataModule())
    assert "perturbation" not in callback.config.metadata
    assert callback.config == derive_config(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"derive": "argmax"}, "`derive` must be one of"),
        ({"monitor_mode": "up"}, "`monitor_mode` must be 'min' or 'max'"),
    ],
)
def test_bad_derive_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoNorm(mode="learn", **kwargs)


def _finalize_run(tmp_path, **options):
    torch.manual_seed(3)
    model, dm = TinyConvNet(), TinyDataModule()
    callback = AutoNorm(
        mode="learn",
        finalize=True,
        init="original",  # bn1, bn2 start (and stay) on batch statistics: BatchNorm is derived
        derive="weights",
        monitor="val_acc",
        monitor_mode="max",
        **options,
    )
    watch = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    trainer = tiny_trainer(tmp_path, [callback, watch], max_epochs=3, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    return model, dm, callback


def test_finalize_keeps_native_layers_that_validate_as_well(tmp_path):
    model, dm, callback = _finalize_run(tmp_path)
    assert callback.finalized is True
    assert callback.config.choices["bn1"].name == "batchnorm"
    assert isinstance(model.bn1, nn.BatchNorm1d) and not isinstance(model.bn1, SwitchableNorm)
    check = callback.config.metadata["finalize"]
    assert check["kept"] and check["monitor"] == "val_acc"
    assert _val(model, dm, "val_acc") == pytest.approx(check["after"])
    assert check["after"] >= 0.95 * check["before"]


def test_finalize_that_wrecks_the_model_keeps_the_switchable_model_and_warns(tmp_path):
    """Recalibrated on inputs far from the data, the new BatchNorms ruin the model: the
    SwitchableNorm model stays, and the warning names both values."""

    def off_data(module, batch):
        return module(batch[0] * 100.0 + 50.0)

    with pytest.warns(UserWarning, match=r"finalize kept the SwitchableNorm model: val_acc "):
        model, dm, callback = _finalize_run(tmp_path, calibration_forward=off_data)
    assert callback.finalized is False
    assert isinstance(model.bn1, SwitchableNorm) and isinstance(model.bn2, SwitchableNorm)
    check = callback.config.metadata["finalize"]
    assert not check["kept"] and check["after"] < 0.95 * check["before"]
    assert _val(model, dm, "val_acc") == pytest.approx(check["before"])  # as it trained
    # the structure recorded for checkpoints is the model's: SwitchableNorm
    assert callback.structure.choices["bn1"].name == "switchable"


def test_the_last_checkpoint_after_finalize_holds_the_finalized_model(tmp_path):
    import autonorm

    torch.manual_seed(0)
    model, dm = TinyConvNet(), TinyDataModule()
    callback = AutoNorm(mode="learn", finalize=True)
    watch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, [callback, watch], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    assert callback.finalized
    restored = autonorm.load_from_checkpoint(TinyConvNet, tmp_path / "ckpt" / "last.ckpt").eval()
    assert not any(isinstance(m, SwitchableNorm) for m in restored.modules())
    for slot in SLOTS:
        assert type(getattr(restored, slot)) is type(getattr(model, slot))
    x, _ = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
