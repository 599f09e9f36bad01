"""The AutoNorm callback with real Trainers on tiny models."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import StochasticWeightAveraging
from pytorch_lightning.loggers import CSVLogger
from torch import nn

import autonorm
from autonorm import AutoNormError, NormConfig
from autonorm.callbacks import AutoNorm
from autonorm.norms import SwitchableNorm
from tests.lightning_models import NoNormNet, TinyConvNet, TinyDataModule, tiny_trainer

SLOTS = ["bn1", "bn2", "head_norm"]


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(getattr(model, name)) for name in SLOTS}


def test_learn_mode_trains_mixing_weights_and_writes_config(tmp_path):
    model = TinyConvNet()
    callback = AutoNorm(mode="learn")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=3, logger=CSVLogger(tmp_path))
    trainer.fit(model, datamodule=TinyDataModule())

    assert all(isinstance(getattr(model, n), SwitchableNorm) for n in SLOTS)
    start = torch.ones(3)  # SN logits start equal
    moved = [not torch.allclose(getattr(model, n).mean_weight.detach(), start) for n in SLOTS]
    assert all(moved)
    assert set(callback.config.choices) == set(SLOTS)
    written = NormConfig.load(callback.resolved_config_path(trainer))
    assert written == callback.config
    assert (
        callback.resolved_config_path(trainer).parent == tmp_path / "lightning_logs" / "version_0"
    )
    assert len(callback.mixing_history) == 3
    metrics = (
        (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    )
    assert "autonorm/bn1/mean_batch" in metrics


def test_every_parameter_of_the_rewritten_model_is_in_the_optimizer(tmp_path):
    model = TinyConvNet()
    trainer = tiny_trainer(tmp_path, [AutoNorm(mode="learn")], max_epochs=1)
    trainer.fit(model, datamodule=TinyDataModule())
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == in_optimizer
    assert any(isinstance(m, SwitchableNorm) for m in model.modules())


def test_setup_again_does_not_rewrite_twice(tmp_path):
    model = TinyConvNet()
    callback = AutoNorm(
        config=NormConfig({"bn1": "groupnorm", "bn2": "layernorm", "head_norm": "rmsnorm"})
    )
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    dm = TinyDataModule()
    trainer.fit(model, datamodule=dm)
    layers = {n: getattr(model, n) for n in SLOTS}
    trainer.validate(model, datamodule=dm, verbose=False)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert all(getattr(model, n) is layers[n] for n in SLOTS)
    assert isinstance(model.bn1, nn.GroupNorm) and isinstance(model.head_norm, nn.RMSNorm)


def test_fixed_mode_from_a_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    NormConfig(
        {"bn1": {"name": "groupnorm", "groups": 2}, "bn2": "instancenorm", "head_norm": "layernorm"}
    ).save(path)
    model = TinyConvNet()
    tiny_trainer(tmp_path, [AutoNorm(config=path)], max_epochs=1).fit(
        model, datamodule=TinyDataModule()
    )
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 2
    assert isinstance(model.bn2, nn.InstanceNorm1d)


def test_finalize_swaps_in_native_layers_and_recalibrates_batchnorm(tmp_path):
    model = TinyConvNet()
    callback = AutoNorm(
        mode="learn",
        finalize=True,
        finalize_batches=3,
        candidates={"channels_first": ("batch",), "channels_last": ("layer",)},
    )
    tiny_trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=TinyDataModule())
    assert not any(isinstance(m, SwitchableNorm) for m in model.modules())
    assert isinstance(model.bn1, nn.BatchNorm1d) and isinstance(model.head_norm, nn.LayerNorm)
    # recalibrated with a cumulative average over exactly 3 batches
    assert int(model.bn1.num_batches_tracked) == 3
    assert model.bn1.momentum == 0.1
    assert callback.config["bn1"].name == "batchnorm"


@pytest.mark.parametrize("autonorm_first", [True, False])
def test_swa_sees_the_rewritten_model_in_either_order(tmp_path, autonorm_first):
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    an = AutoNorm(mode="learn")
    callbacks = [an, swa] if autonorm_first else [swa, an]
    model = TinyConvNet()
    tiny_trainer(tmp_path, callbacks, max_epochs=2).fit(model, datamodule=TinyDataModule())
    assert isinstance(swa._average_model.bn1, SwitchableNorm)
    assert isinstance(model.bn1, SwitchableNorm)


def test_unknown_callback_holding_a_model_copy_before_autonorm_is_refused(tmp_path):
    class CopyingCallback(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            import copy

            self.shadow = copy.deepcopy(pl_module)

    model = TinyConvNet()
    with pytest.raises(AutoNormError, match="put AutoNorm first"):
        tiny_trainer(tmp_path, [CopyingCallback(), AutoNorm(mode="learn")], max_epochs=1).fit(
            model, datamodule=TinyDataModule()
        )


def test_model_without_norm_slots_is_refused(tmp_path):
    with pytest.raises(AutoNormError, match="no normalization slot"):
        tiny_trainer(tmp_path, [AutoNorm(mode="learn")], max_epochs=1).fit(
            NoNormNet(), datamodule=TinyDataModule()
        )


def test_config_that_does_not_match_the_model(tmp_path):
    cfg = NormConfig({"bn1": "groupnorm", "nope": "layernorm"})
    with pytest.raises(autonorm.ConfigError, match="nope"):
        tiny_trainer(tmp_path, [AutoNorm(config=cfg)], max_epochs=1).fit(
            TinyConvNet(), datamodule=TinyDataModule()
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sometimes"}, "`mode` must be one of"),
        ({"trial": object(), "config": NormConfig({"a": "layernorm"})}, "not both"),
        ({"mode": "fixed"}, "needs `config`"),
        ({"mode": "learn", "mixing_lr_scale": -1.0}, "mixing_lr_scale"),
        ({"config": NormConfig({"a": "layernorm"}), "finalize": True}, "mode='learn' only"),
        ({"monitor": ""}, "`monitor`"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoNorm(**kwargs)
