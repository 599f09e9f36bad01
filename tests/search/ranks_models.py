"""A tiny Conv1d LightningModule and data for trials on several ranks (CPU, gloo), with the
faults the tests inject on rank 1 and a callback that records what each rank saw.

``RANKS_TEST_DIR`` (an environment variable every rank inherits) names a folder: a file
``kill-rank1`` there makes rank 1 kill itself (SIGKILL) at its next training step, ``stop-rank1``
stop itself (SIGSTOP), ``oom-rank1`` raise an out-of-memory error; each file is used once. :class:`Record` appends, on
rank 0, the validation loss over the whole validation set computed here (a plain loop, no
collectives) after every validation, and writes each rank's first norm layer (its class and
state) after the first training step of a training, one file per class and rank.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FAULTS_ENV = "RANKS_TEST_DIR"


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 16, generator=g) + (y.float() - 0.5)[:, None, None]
    return TensorDataset(x, y)


def _take_fault(name: str) -> bool:
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return False
    try:
        (Path(folder) / name).unlink()
    except FileNotFoundError:
        return False
    return True


class RanksNet(pl.LightningModule):
    """Two conv blocks with GroupNorm (the slots: a norm whose model is the same on every rank,
    so that the whole validation set's loss is one model's), logged ``val_loss`` without
    ``sync_dist`` (autonorm reduces it over the ranks itself)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv1d(1, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(8, 2),
        )
        self.example_input_array = torch.zeros(4, 1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and _take_fault("kill-rank1"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.global_rank == 1 and _take_fault("stop-rank1"):
            os.kill(os.getpid(), signal.SIGSTOP)  # alive, silent: rank 0's collectives time out
        if self.global_rank == 1 and _take_fault("oom-rank1"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RanksData(pl.LightningDataModule):
    """64 training and 32 validation samples; the validation set splits evenly over 2 ranks."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set, self.val_set = _dataset(64, 0), _dataset(32, 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class Record(pl.Callback):
    """What the tests check a trial against, written where ``RANKS_TEST_DIR`` says."""

    def on_validation_epoch_end(self, trainer, pl_module):  # before a trial's pruning
        folder = os.environ.get(FAULTS_ENV)
        if trainer.sanity_checking or not folder or trainer.global_rank != 0:
            return
        x, y = RanksData().val_set.tensors
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():  # the whole validation set at once, in this process alone
            loss = float(F.cross_entropy(pl_module(x.to(pl_module.device)), y.to(pl_module.device)))
        pl_module.train(was_training)
        with (Path(folder) / "whole_val_loss.jsonl").open("a") as out:
            out.write(json.dumps({"epoch": trainer.current_epoch, "loss": loss}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """After the first training step: DDP broadcast rank 0's buffers before the step's
        forward, so the ranks' running statistics now differ unless the forward took the
        same (global) batch statistics on every rank."""
        folder = os.environ.get(FAULTS_ENV)
        if not folder or batch_idx != 0 or trainer.current_epoch != 0:
            return
        norm = pl_module.net[1]
        state = {k: v.detach().cpu().clone() for k, v in norm.state_dict().items()}
        record = {"kind": type(norm).__name__, "state": state}
        torch.save(record, Path(folder) / f"{record['kind']}-rank{trainer.global_rank}.pt")
