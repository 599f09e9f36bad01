"""MNIST-1D (Greydanus 2020) as a LightningDataModule. The ``mnist1d`` package generates the
data offline in a few seconds; nothing is downloaded."""

from __future__ import annotations

import functools

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


@functools.lru_cache(maxsize=4)
def mnist1d_tensors(num_samples: int = 5000, seed: int = 42) -> dict[str, torch.Tensor]:
    """Generate MNIST-1D once per process: 40-step signals, 10 classes (80/20 train/test)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)
    return {
        "x": torch.as_tensor(data["x"], dtype=torch.float32).unsqueeze(1),
        "y": torch.as_tensor(data["y"], dtype=torch.long),
        "x_test": torch.as_tensor(data["x_test"], dtype=torch.float32).unsqueeze(1),
        "y_test": torch.as_tensor(data["y_test"], dtype=torch.long),
    }


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D signals of shape (1, 40) and labels 0-9.

    Args:
        batch_size: per-device training batch size (autonorm's budget may override it).
        num_samples: generated samples in all (80% train, 20% validation).
        train_fraction: the fraction of the training split actually used (small and fast runs).
        seed: the generator's seed.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_samples: int = 5000,
        train_fraction: float = 1.0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.train_fraction = train_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        data = mnist1d_tensors(self.num_samples, self.seed)
        n_train = max(int(len(data["x"]) * self.train_fraction), 2)
        self.train_set = TensorDataset(data["x"][:n_train], data["y"][:n_train])
        self.val_set = TensorDataset(data["x_test"], data["y_test"])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
