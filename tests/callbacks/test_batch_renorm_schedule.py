"""A Trainer run scales Batch Renormalization's schedule (the paper's 5000 + 20000 steps) to its
own length, so the corrections act within it; a schedule the user gave stays."""

from __future__ import annotations

from autonorm.callbacks import FixedNorms
from autonorm.config import NormConfig
from autonorm.norms import BatchRenorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


def test_a_fit_scales_the_schedule_to_its_steps(tmp_path):
    config = NormConfig({"bn1": "batchrenorm", "bn2": "batchrenorm(warmup_steps=7, ramp_steps=9)"})
    model = TinyConvNet()
    trainer = tiny_trainer(tmp_path, [FixedNorms(config, include=["bn1", "bn2"])], max_epochs=4)
    trainer.fit(model, TinyDataModule(batch_size=16))
    steps = trainer.global_step
    assert steps == 4 * 96 // 16
    scaled, given = model.bn1, model.bn2
    assert isinstance(scaled, BatchRenorm) and isinstance(given, BatchRenorm)
    assert (scaled.warmup_steps, scaled.ramp_steps) == (round(0.05 * steps), round(0.2 * steps))
    assert int(scaled.num_batches_tracked) == steps
    assert scaled.limits() == (3.0, 5.0)  # past its ramp by the end of the run
    assert (given.warmup_steps, given.ramp_steps) == (7, 9)


def test_an_endless_run_keeps_the_papers_schedule(tmp_path):
    model = TinyConvNet()
    callback = FixedNorms(NormConfig({"bn1": "batchrenorm"}), include="bn1")
    trainer = tiny_trainer(
        tmp_path, [callback], max_epochs=-1, max_steps=-1, max_time="00:00:00:02"
    )
    trainer.fit(model, TinyDataModule(batch_size=16))
    assert (model.bn1.warmup_steps, model.bn1.ramp_steps) == (5000, 20000)
