"""Every training of a search gets its own copy of the user's Lightning callbacks: an
EarlyStopping shared by the trials would carry the first trial's best score into the next."""

from __future__ import annotations

import threading

import pytest
from pytorch_lightning.callbacks import EarlyStopping

import autonorm
from autonorm import AutoNormError
from tests.lightning_models import TinyConvNet, TinyDataModule

#: (id of the callback object, its best score when a fit starts), per fit
SEEN: list[tuple[int, float]] = []


class RecordingEarlyStopping(EarlyStopping):
    def on_fit_start(self, trainer, pl_module):
        SEEN.append((id(self), float(self.best_score)))


def _search(tmp_path, callbacks, **kwargs):
    return autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        n_trials=3,
        trainer_kwargs={"max_epochs": 2, "callbacks": callbacks},
        out_dir=tmp_path / "run",
        seed=0,
        space="minimal",
        warm_start=False,
        sampler="random",
        **kwargs,
    )


def test_each_trial_starts_with_a_fresh_copy_of_the_users_early_stopping(tmp_path):
    SEEN.clear()
    given = RecordingEarlyStopping(monitor="val_loss", patience=0, mode="min")
    result = _search(tmp_path, [given])
    trained = [t for t in result.study.trials if t.state.is_finished()]
    assert len(SEEN) == len(trained) == 3
    assert all(score == float("inf") for _, score in SEEN)  # no trial inherits a best score
    assert len({callback for callback, _ in SEEN}) == 3  # one object per trial
    assert id(given) not in {callback for callback, _ in SEEN}  # the user's object untouched
    assert float(given.best_score) == float("inf")


def test_a_factory_makes_each_trials_callbacks(tmp_path):
    SEEN.clear()
    _search(tmp_path, lambda: [RecordingEarlyStopping(monitor="val_loss", mode="min")])
    assert len(SEEN) == 3 and len({callback for callback, _ in SEEN}) == 3


class Locked(EarlyStopping):
    def __init__(self):
        super().__init__(monitor="val_loss")
        self.lock = threading.Lock()  # cannot be deep-copied


def test_a_callback_that_cannot_be_copied_is_refused_naming_the_factory_form(tmp_path):
    with pytest.raises(AutoNormError, match=r"trainer callback Locked cannot be copied .*factory"):
        _search(tmp_path, [Locked()])
