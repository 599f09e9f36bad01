"""A config records the model class it was made for: applying it to another class is refused
unless told (``check_model=False``); subclasses and a script's ``__main__`` class pass."""

from __future__ import annotations

import pytest
import torch

import autonorm
from autonorm import ConfigError, NormConfig
from autonorm.callbacks import AutoNorm
from tests.lightning_models import NoExampleNet, TinyConvNet, TinyDataModule, tiny_trainer


def test_a_config_for_another_model_class_is_refused_unless_told(tmp_path):
    config = NormConfig(
        {"bn1": "groupnorm", "bn2": "groupnorm", "head_norm": "layernorm"},
        metadata={"model_class": "tests.models.FusedNormNet"},
    )
    with pytest.raises(
        ConfigError, match=r"made for tests.models.FusedNormNet, not for .*TinyConv"
    ):
        autonorm.apply_config(TinyConvNet(), config)
    model = autonorm.apply_config(TinyConvNet(), config, check_model=False)
    assert isinstance(model.bn1, torch.nn.GroupNorm)
    own = NormConfig(config.choices, metadata={"model_class": "tests.lightning_models.TinyConvNet"})
    assert isinstance(
        autonorm.apply_config(NoExampleNet(), own).bn1, torch.nn.GroupNorm
    )  # subclass
    script = NormConfig(config.choices, metadata={"model_class": "__main__.TinyConvNet"})
    assert isinstance(autonorm.apply_config(TinyConvNet(), script).bn1, torch.nn.GroupNorm)
    path = config.save(tmp_path / "other.yaml")
    trainer = tiny_trainer(tmp_path, [AutoNorm(config=path)], max_epochs=1)
    with pytest.raises(ConfigError, match="check_model=False"):
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    model = TinyConvNet()
    tiny_trainer(tmp_path, [AutoNorm(config=path, check_model=False)], max_epochs=1).fit(
        model, datamodule=TinyDataModule()
    )
    assert isinstance(model.bn2, torch.nn.GroupNorm)
