"""A tiny Llama-style causal language model (Hugging Face ``transformers``, built from a
``LlamaConfig``: nothing is downloaded) on synthetic token sequences, written with
``import lightning as L``.

Each sequence counts modulo the vocabulary from a random start with a random stride
(``3, 8, 13, 18, ...``): the next token follows from the two before it, so the model learns it
in a few epochs and ``val_acc`` (next-token accuracy after the second position) separates the
norm choices. Its five ``LlamaRMSNorm`` layers are the norm slots autonorm searches.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM


def counting_sequences(n: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``n`` sequences ``(start + stride * t) % vocab_size`` (deterministic for ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (n, 1), generator=g)
    stride = torch.randint(1, 6, (n, 1), generator=g)
    return (start + stride * torch.arange(length)) % vocab_size


class TokenData(L.LightningDataModule):
    """Counting sequences: ``n_train`` to train on, ``n_train // 4`` to validate on.

    Args:
        batch_size: per-device training batch size.
        n_train: training sequences.
        length: tokens per sequence.
        vocab_size: the model's vocabulary.
    """

    def __init__(
        self, batch_size: int = 32, n_train: int = 512, length: int = 16, vocab_size: int = 32
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.n_train = n_train
        self.length = length
        self.vocab_size = vocab_size

    def setup(self, stage: str | None = None) -> None:
        make = counting_sequences
        self.train_set = TensorDataset(make(self.n_train, self.length, self.vocab_size, seed=0))
        self.val_set = TensorDataset(make(self.n_train // 4, self.length, self.vocab_size, seed=1))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, drop_last=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


class TinyLlama(L.LightningModule):
    """``LlamaForCausalLM`` at toy size; logs ``val_loss`` and ``val_acc`` (next token).

    Args:
        vocab_size: tokens.
        hidden_size: model width (the norm slots' channel count).
        layers: decoder layers (two RMSNorm slots each, plus the final norm).
        heads: attention heads.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        hidden_size: int = 32,
        layers: int = 2,
        heads: int = 2,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=64,
        )
        self.llama = LlamaForCausalLM(config)
        self.example_input_array = torch.zeros(2, 16, dtype=torch.long)  # for autonorm's probe

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=tokens).logits

    def _next_token(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (tokens,) = batch
        logits = self(tokens)[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]), logits

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._next_token(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._next_token(batch)
        (tokens,) = batch
        hits = logits[:, 1:].argmax(-1) == tokens[:, 2:]  # from the third token: stride known
        self.log("val_loss", loss)
        self.log("val_acc", hits.float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
