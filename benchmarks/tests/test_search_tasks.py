"""The search benchmark's tasks build, expose their norm slots and train with a real Trainer."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

import autonorm
from autonorm.callbacks import AutoNorm
from benchmarks.search_tasks import TASKS, make_digits, make_sequences, make_volumes

#: The fewest norm slots each task must offer the search.
MIN_SLOTS = {"cnn2d-b2": 12, "unet3d-b2": 10, "llama-lm": 5}


def test_every_task_is_checked() -> None:
    assert set(MIN_SLOTS) == set(TASKS)


@pytest.mark.parametrize("make", [make_digits, make_volumes, make_sequences])
def test_data_is_deterministic_from_its_seed(make) -> None:
    first, again, other = make(0), make(0), make(1)
    for a, b in zip(first[0] + first[1], again[0] + again[1], strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0][0], other[0][0])


def test_llama_norms_are_rmsnorm_slots_the_lm_families_fit() -> None:
    slots = autonorm.find_slots(TASKS["llama-lm"].model())
    assert [s.name for s in slots] == [
        "blocks.0.attn_norm",
        "blocks.0.mlp_norm",
        "blocks.1.attn_norm",
        "blocks.1.mlp_norm",
        "final_norm",
    ]
    assert {s.kind for s in slots} == {"rmsnorm"}
    assert {s.layout for s in slots} == {"channels_last"}
    assert TASKS["llama-lm"].families == ("rmsnorm", "layernorm", "dyt")


def test_volume_labels_mark_some_foreground() -> None:
    (_, labels), _ = make_volumes(0, n_train=8, n_val=0)
    fraction = labels.float().mean().item()
    assert labels.dtype == torch.long
    assert 0.01 < fraction < 0.3


@pytest.mark.parametrize("key", sorted(TASKS))
def test_task_trains_one_step_with_a_uniform_config(key: str, tmp_path) -> None:
    task = TASKS[key]
    model = task.model()
    slots = autonorm.find_slots(model)
    assert len(slots) >= MIN_SLOTS[key]
    # the last family differs from every model's own norms: the callback really swaps layers
    config = autonorm.NormConfig.uniform(slots, task.families[-1])
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AutoNorm(config=config, record_metrics=False)],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=task.data(task.batch_size))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    score = float(trainer.callback_metrics[task.metric])
    assert 0.0 <= score <= 1.0
    norms = [type(m).__name__ for name, m in model.named_modules() if name == slots[0].name]
    assert norms == ["DyT"]
