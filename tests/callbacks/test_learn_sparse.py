"""Learn mode with Sparse SN (mixing="sparsestmax"): real Trainers on a tiny model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from autonorm import AutoNormError, NormConfig, to_switchable
from autonorm.callbacks import AutoNorm
from autonorm.callbacks._ssn import radius_fraction
from autonorm.norms import SwitchableNorm
from autonorm.surgery._derive import CANDIDATE_CHOICES
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer

SLOTS = ["bn1", "bn2", "head_norm"]


class RadiusRecorder(pl.Callback):
    """Records every Sparse SN radius at each training batch (listed after AutoNorm)."""

    def __init__(self) -> None:
        self.radii: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.radii.append(
            {
                name: float(m.radius)
                for name, m in pl_module.named_modules()
                if isinstance(m, SwitchableNorm) and m.radius is not None
            }
        )


def _one_hot(weights: dict[str, float]) -> str:
    """The candidate of weights that are exactly one-hot."""
    assert sorted(weights.values()) == [0.0] * (len(weights) - 1) + [1.0], weights
    return max(weights, key=weights.__getitem__)


def test_sparse_learn_ends_one_hot_and_derives_the_trained_choice(tmp_path):
    model = TinyConvNet()
    callback = AutoNorm(mode="learn", mixing="sparsestmax", config_path=tmp_path / "c.yaml")
    recorder = RadiusRecorder()
    trainer = tiny_trainer(tmp_path, [callback, recorder], max_epochs=4)
    trainer.fit(model, datamodule=TinyDataModule())

    layers = {name: getattr(model, name) for name in SLOTS}
    assert all(
        isinstance(sn, SwitchableNorm) and sn.mixing == "sparsestmax" for sn in layers.values()
    )
    for name, sn in layers.items():
        assert float(sn.radius) == pytest.approx(sn.vertex_radius)
        weights = sn.mixing_weights()
        chosen = _one_hot(weights["mean"])
        assert _one_hot(weights["var"]) == chosen  # one normalizer: the derived choice is it
        assert callback.config.choices[name] == CANDIDATE_CHOICES[sn.layout][chosen]
    assert callback.config.metadata["mixing"] == "sparsestmax"
    assert NormConfig.load(tmp_path / "c.yaml") == callback.config

    # the radius grew in steps from sparsemax (0) to the vertex, reached at 80% of the steps
    total = len(recorder.radii)
    assert total == trainer.estimated_stepping_batches == 4 * (96 // 16)
    bn1 = [r["bn1"] for r in recorder.radii]
    assert bn1[0] == 0.0 and bn1 == sorted(bn1)
    vertex = layers["bn1"].vertex_radius
    expected = [radius_fraction(step, total) * vertex for step in range(total)]
    torch.testing.assert_close(torch.tensor(bn1), torch.tensor(expected))
    assert len(set(bn1)) == 5  # sparsemax, three steps, the vertex
    assert bn1.index(max(bn1)) == math.ceil(0.8 * total)


def test_the_search_signature_splits_the_logits_and_honours_include(tmp_path):
    """The call autonorm.search makes for its learned warm start."""
    model = TinyConvNet(lr=0.05)
    callback = AutoNorm(
        mode="learn",
        mixing="sparsestmax",
        mixing_lr_scale=0.1,
        mixing_weight_decay=0.0,
        config_path=tmp_path / "learned.yaml",
        record_metrics=False,
        include="bn*",
        exclude="bn2",
        example_input=torch.zeros(4, 2, 16),
    )
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(model, datamodule=TinyDataModule())

    assert isinstance(model.bn1, SwitchableNorm) and model.bn1.mixing == "sparsestmax"
    assert not isinstance(model.bn2, SwitchableNorm)
    assert not isinstance(model.head_norm, SwitchableNorm)
    groups = trainer.optimizers[0].param_groups
    mixing = [g for g in groups if any(p is model.bn1.mean_weight for p in g["params"])]
    assert len(mixing) == 1 and mixing[0]["lr"] == pytest.approx(0.005)
    assert mixing[0]["weight_decay"] == 0.0
    _one_hot(model.bn1.mixing_weights()["mean"])
    learned = NormConfig.load(tmp_path / "learned.yaml")
    assert set(learned.choices) == {"bn1"} and learned.metadata["mixing"] == "sparsestmax"


def test_trained_sparse_model_round_trips_through_its_state_dict(tmp_path):
    model = TinyConvNet()
    trainer = tiny_trainer(tmp_path, [AutoNorm(mode="learn", mixing="sparsestmax")], max_epochs=2)
    trainer.fit(model, datamodule=TinyDataModule())
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)

    fresh = to_switchable(TinyConvNet(), mixing="sparsestmax")
    fresh.load_state_dict(torch.load(path))
    assert float(fresh.bn1.radius) == pytest.approx(fresh.bn1.vertex_radius)
    assert fresh.bn1.mixing_weights() == model.bn1.mixing_weights()
    x = torch.randn(5, 2, 16)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_softmax_learn_is_unchanged_and_records_its_mixing(tmp_path):
    model = TinyConvNet()
    callback = AutoNorm(mode="learn")
    tiny_trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=TinyDataModule())
    assert model.bn1.mixing == "softmax" and model.bn1.radius is None
    assert callback.config.metadata["mixing"] == "softmax"


def test_sparse_learn_needs_a_known_training_length(tmp_path):
    callback = AutoNorm(mode="learn", mixing="sparsestmax")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=-1, max_steps=-1)
    with pytest.raises(AutoNormError, match="max_epochs or max_steps"):
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "learn", "mixing": "sparsemax"}, "`mixing` must be one of"),
        (
            {"config": NormConfig({"bn1": "layernorm"}), "mixing": "sparsestmax"},
            "mode='learn' only",
        ),
    ],
)
def test_bad_mixing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoNorm(**kwargs)
