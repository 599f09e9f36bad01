"""The mixing logits' own param group (learn mode's ``mixing_lr_scale``)."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from autonorm import AutoNormError
from autonorm.callbacks import AutoNorm, split_mixing_group
from autonorm.callbacks._optimizers import optimizers_and_schedulers
from autonorm.norms import SwitchableNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


def test_mixing_lr_scale_puts_logits_in_their_own_group_and_resumes(tmp_path):
    class WithScheduler(TinyConvNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    model = WithScheduler()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = AutoNorm(mode="learn", mixing_lr_scale=0.1, mixing_weight_decay=0.0)
    trainer = tiny_trainer(tmp_path, [callback, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, datamodule=TinyDataModule())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    mixing = {
        id(p)
        for sn in model.modules()
        if isinstance(sn, SwitchableNorm)
        for p in (sn.mean_weight, sn.var_weight)
    }
    assert {id(p) for p in groups[1]["params"]} == mixing
    assert groups[1]["weight_decay"] == 0.0
    # StepLR halved both groups twice: the mixing group keeps its 0.1 ratio
    assert groups[0]["lr"] == pytest.approx(0.025) and groups[1]["lr"] == pytest.approx(0.0025)

    resumed = WithScheduler()
    trainer2 = tiny_trainer(
        tmp_path,
        [AutoNorm(mode="learn", mixing_lr_scale=0.1, mixing_weight_decay=0.0)],
        max_epochs=3,
    )
    trainer2.fit(
        resumed, datamodule=TinyDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert trainer2.current_epoch == 3
    assert trainer2.optimizers[0].param_groups[1]["lr"] == pytest.approx(0.00125)


def test_split_mixing_group_without_lightning():
    layer, sn = nn.Linear(4, 4), SwitchableNorm(4)
    params = [*layer.parameters(), *sn.parameters()]
    opt = torch.optim.SGD(params, lr=0.2, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    mixing = {id(sn.mean_weight), id(sn.var_weight)}
    split_mixing_group(opt, mixing, lr_scale=0.5, weight_decay=0.0, schedulers=[scheduler])
    assert [len(g["params"]) for g in opt.param_groups] == [len(params) - 2, 2]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == 2


def test_split_mixing_group_refuses_a_cyclic_scheduler():
    sn = SwitchableNorm(4)
    opt = torch.optim.SGD(sn.parameters(), lr=0.1)
    cyclic = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    with pytest.raises(AutoNormError, match="OneCycleLR"):
        split_mixing_group(opt, {id(sn.mean_weight)}, lr_scale=0.1, schedulers=[cyclic])


def test_optimizers_and_schedulers_reads_every_configure_optimizers_shape():
    a = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    b = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sa = torch.optim.lr_scheduler.StepLR(a, 1)
    assert optimizers_and_schedulers(a) == [(a, [])]
    assert optimizers_and_schedulers({"optimizer": a, "lr_scheduler": {"scheduler": sa}}) == [
        (a, [sa])
    ]
    assert optimizers_and_schedulers(([a, b], [sa])) == [(a, [sa]), (b, [])]
    assert optimizers_and_schedulers([a, b]) == [(a, []), (b, [])]
