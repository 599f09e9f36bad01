"""A small pre-LN transformer over MNIST-1D: the 40-step signal is cut into 10 tokens of 4
samples. Its LayerNorm slots are channels-last (``(N, T, C)``); use with
``examples.mnist1d_cnn.data.MNIST1DDataModule``."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MNIST1DTransformer(pl.LightningModule):
    """Patch embedding, ``depth`` pre-LN blocks, a final norm, mean pooling, a linear head.

    Args:
        dim: token width.
        depth: number of blocks.
        heads: attention heads.
        patch: signal samples per token.
        lr: AdamW learning rate.
    """

    def __init__(
        self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 4, lr: float = 3e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, 40 // patch, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        self.example_input_array = torch.zeros(4, 1, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], -1, self.hparams.patch)) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.final_norm(tokens).mean(1))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
