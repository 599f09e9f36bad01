"""Benchmark tasks where the norm choice matters and slots are many (issue 14).

Three tasks, each a model, its data (generated in memory, deterministic from a seed; nothing is
downloaded), a per-device batch size, the metric and the epochs of one training:

  cnn2d-b2   a ResNet-style 2-D CNN (14 BatchNorm slots: stem, three stages of residual blocks
             with 1x1 shortcut convs + BN, a head) on scikit-learn's digits, upsampled to 16x16,
             padded to 20x20, with a random contrast and noise per image; batch 2.
  unet3d-b2  a small 3-D UNet (10 BatchNorm3d slots) segmenting spheres among cube distractors in
             16^3 noisy volumes with a random intensity scale, offset and bias field per volume;
             batch 2; ``val_acc`` is the foreground Dice over the validation set.
  llama-lm   a 2-layer Llama-style decoder (RMSNorm pre-norm blocks and a final RMSNorm, rotary
             positions, SwiGLU MLP, d=64) on sequences that follow one of two hidden rules
             (a repeated block, an arithmetic progression), with a few corrupted tokens;
             ``val_acc`` is next-token accuracy.

Each training (one seed, the task's epochs) takes about 10 s or less on one CPU thread. The
settings were fixed before any search was run on them. Measure every uniform family::

    python benchmarks/search_tasks.py                 # all tasks, 2 seeds
    python benchmarks/search_tasks.py --tasks llama-lm --seeds 3
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# -- data ------------------------------------------------------------------------------------


class TensorDataModule(pl.LightningDataModule):
    """Train and validation tensors made by ``make(seed)`` in ``setup``; shuffling is seeded.

    Args:
        make: ``make(seed) -> (train tensors, val tensors)``, each a tuple of equal-length tensors.
        batch_size: per-device training batch size.
        val_batch_size: validation batch size.
        seed: the data's seed (the same data for every training seed).
    """

    def __init__(
        self,
        make: Callable[[int], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]],
        batch_size: int,
        val_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got batch_size={batch_size}")
        self.make = make
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        train, val = self.make(self.seed)
        self.train_set = TensorDataset(*train)
        self.val_set = TensorDataset(*val)

    def train_dataloader(self) -> DataLoader:
        # no generator of its own: the order follows the training seed (seed_everything)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size)


def make_digits(
    seed: int, n_train: int = 600
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """scikit-learn's 1797 digits, upsampled to 16x16 and padded to 20x20, with a random
    contrast (x1/3 to x3) and noise per image: a per-image scale that per-sample norms remove
    and batch-2 BatchNorm cannot; ``n_train`` images for training, the rest for validation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    n = len(x)
    canvas = F.pad(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False), [2] * 4)
    contrast = torch.exp(torch.empty(n, 1, 1, 1).uniform_(-math.log(3), math.log(3), generator=g))
    noise = 0.15 * torch.randn(n, 1, 20, 20, generator=g)
    images = contrast * (canvas + noise)
    order = torch.randperm(n, generator=g)
    train, val = order[:n_train], order[n_train:]
    return (images[train], y[train]), (images[val], y[val])


def make_volumes(
    seed: int, n_train: int = 96, n_val: int = 64, size: int = 16, objects: int = 3
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Volumes with up to ``objects`` spheres (foreground, label 1) and as many cubes
    (distractors of the same brightness), noise, a linear bias field and a random intensity
    scale (x0.2 to x5) and offset per volume; labels are ``(N, D, H, W)`` int64."""
    n = n_train + n_val
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, S, S, S)
    grid = grid.view(1, 1, 3, size, size, size)

    def shapes(low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        radius = torch.empty(n, objects).uniform_(low, high, generator=g)
        centre = radius.unsqueeze(-1) + torch.rand(n, objects, 3, generator=g) * (
            size - 1 - 2 * radius.unsqueeze(-1)
        )
        present = torch.rand(n, objects, generator=g) < 0.7
        present[:, 0] = True  # at least one of each
        offset = grid - centre.view(n, objects, 3, 1, 1, 1)
        return radius.view(n, objects, 1, 1, 1), offset, present.view(n, objects, 1, 1, 1)

    radius, offset, present = shapes(2.0, 3.5)
    spheres = ((offset.pow(2).sum(2) <= radius**2) & present).any(1)
    radius, offset, present = shapes(1.5, 3.0)
    cubes = ((offset.abs().amax(2) <= radius) & present).any(1)
    objects_mask = (spheres | cubes).float().unsqueeze(1)
    direction = torch.randn(n, 3, 1, 1, 1, generator=g)
    centred = grid.view(1, 3, size, size, size) / (size - 1) - 0.5
    bias = (direction * centred).sum(1, keepdim=True)
    noise = 0.35 * torch.randn(n, 1, size, size, size, generator=g)
    scale = torch.exp(torch.empty(n, 1, 1, 1, 1).uniform_(math.log(0.2), math.log(5), generator=g))
    shift = 3.0 * torch.randn(n, 1, 1, 1, 1, generator=g)
    volumes = scale * (objects_mask + bias + noise) + shift
    labels = spheres.long()
    return (volumes[:n_train], labels[:n_train]), (volumes[n_train:], labels[n_train:])


def make_sequences(
    seed: int, n_train: int = 4096, n_val: int = 1024, length: int = 32, vocab: int = 32
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Token sequences ``(N, length + 1)``; half repeat a random block of 3 to 8 tokens, half
    are arithmetic progressions mod ``vocab`` with a step of 1 to 4; 3% of the tokens are then
    replaced at random. The best possible next-token accuracy is about 85%."""
    n = n_train + n_val
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length + 1)
    period = torch.randint(3, 9, (n, 1), generator=g)
    block = torch.randint(0, vocab, (n, 8), generator=g)
    repeat = block.gather(1, t.unsqueeze(0) % period)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 5, (n, 1), generator=g)
    progression = (start + step * t) % vocab
    rule = torch.rand(n, 1, generator=g) < 0.5
    tokens = torch.where(rule, repeat, progression)
    noisy = torch.rand(tokens.shape, generator=g) < 0.03
    tokens = torch.where(noisy, torch.randint(0, vocab, tokens.shape, generator=g), tokens)
    return (tokens[:n_train],), (tokens[n_train:],)


# -- models ----------------------------------------------------------------------------------


class _Trained(pl.LightningModule):
    """AdamW with a short linear warm-up and a cosine decay over the whole fit (the last
    epoch's metric then varies less between seeds); subclasses define ``forward`` and
    ``_loss_and_score``."""

    def __init__(self, lr: float, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay

    def _loss_and_score(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss_and_score(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss, score = self._loss_and_score(batch)
        self.log("val_loss", loss)
        self.log("val_acc", score)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, total // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (
                1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class _Classifier(_Trained):
    def _loss_and_score(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the input (through a 1x1 conv + BN where the shape
    changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()  # a module: the activation a choice like frn may replace
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet2d(_Classifier):
    """Stem conv + BN, three stages (the first block of each with a 1x1 shortcut, the last
    stage with a second block), a head (1x1 conv + BN, global pool, linear + BatchNorm1d,
    linear): 14 BatchNorm slots.

    Args:
        width: channels of the first stage (doubled at each later stage).
        classes: output classes.
        lr: peak AdamW learning rate.
    """

    def __init__(self, width: int = 8, classes: int = 10, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.stage1 = nn.Sequential(ResidualBlock(w, 2 * w))
        self.stage2 = nn.Sequential(ResidualBlock(2 * w, 4 * w, 2))
        self.stage3 = nn.Sequential(ResidualBlock(4 * w, 8 * w, 2), ResidualBlock(8 * w, 8 * w))
        self.head_conv = nn.Conv2d(8 * w, 8 * w, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(8 * w)
        self.head_act = nn.ReLU()
        self.fc = nn.Linear(8 * w, 8 * w, bias=False)
        self.fc_bn = nn.BatchNorm1d(8 * w)
        self.fc_act = nn.ReLU()
        self.out = nn.Linear(8 * w, classes)
        self.example_input_array = torch.zeros(2, 1, 20, 20)
        # the activations right after the norms (a bn2's comes after the residual add: none)
        blocks = [
            f"stage{s}.{i}" for s, stage in enumerate(self.stages, 1) for i in range(len(stage))
        ]
        self.autonorm_activations = {f"{b}.bn1": f"{b}.act1" for b in blocks}
        self.autonorm_activations.update(head_bn="head_act", fc_bn="fc_act")

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        return (self.stage1, self.stage2, self.stage3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = self.head_act(self.head_bn(self.head_conv(x))).mean((2, 3))
        return self.out(self.fc_act(self.fc_bn(self.fc(x))))


def _conv_norm(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU()
    )


class UNet3d(_Trained):
    """A two-level 3-D UNet: (conv3 + BN + ReLU) x2 per level, max-pool down, transposed conv
    up, skip concatenation, a 1x1 conv to 2 classes; 10 BatchNorm3d slots. Loss: cross-entropy
    plus soft Dice; score: the batch's foreground Dice (a whole-set Dice when the validation
    batch holds the whole set, as the task's does).

    Args:
        width: channels of the first level (doubled at each level down).
        lr: peak AdamW learning rate.
    """

    def __init__(self, width: int = 8, lr: float = 3e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        w = width
        self.enc1 = nn.Sequential(_conv_norm(1, w), _conv_norm(w, w))
        self.enc2 = nn.Sequential(_conv_norm(w, 2 * w), _conv_norm(2 * w, 2 * w))
        self.bottom = nn.Sequential(_conv_norm(2 * w, 4 * w), _conv_norm(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = nn.Sequential(_conv_norm(4 * w, 2 * w), _conv_norm(2 * w, 2 * w))
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.dec1 = nn.Sequential(_conv_norm(2 * w, w), _conv_norm(w, w))
        self.head = nn.Conv3d(w, 2, 1)
        self.example_input_array = torch.zeros(2, 1, 16, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        b = self.bottom(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)

    def _loss_and_score(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        foreground = logits.softmax(1)[:, 1]
        target = y.float()
        soft_dice = (2 * (foreground * target).sum() + 1) / (foreground.sum() + target.sum() + 1)
        loss = F.cross_entropy(logits, y) + (1 - soft_dice)
        predicted = (logits.argmax(1) == 1).float()
        dice = 2 * (predicted * target).sum() / (predicted.sum() + target.sum()).clamp_min(1)
        return loss, dice


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions (no biases, as in Llama)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        head_dim = dim // heads
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, heads, T, head_dim)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class LlamaBlock(nn.Module):
    """Pre-norm: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads, max_len)
        self.mlp_norm = nn.RMSNorm(dim)
        hidden = 4 * dim
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaLM(_Trained):
    """Token embedding, ``depth`` Llama blocks, a final RMSNorm, an untied output layer:
    ``2 * depth + 1`` RMSNorm slots. A batch is ``(tokens,)`` of shape ``(N, T + 1)``; the
    model predicts tokens 1..T from 0..T-1.

    Args:
        vocab: vocabulary size.
        dim: model width.
        depth: blocks.
        heads: attention heads.
        max_len: longest input.
        lr: peak AdamW learning rate.
    """

    def __init__(
        self,
        vocab: int = 32,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 64,
        lr: float = 3e-3,
    ) -> None:
        super().__init__(lr, weight_decay=0.1)
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, max_len) for _ in range(depth))
        self.final_norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.example_input_array = torch.zeros(2, 32, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))

    def _loss_and_score(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        target = tokens[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return loss, (logits.argmax(-1) == target).float().mean()


# -- tasks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: a readable name for tables.
        model: builds a fresh model.
        data: ``data(batch_size)`` builds the DataModule.
        batch_size: the per-device batch size of the task.
        metric: the logged metric that judges a training.
        mode: ``"max"`` or ``"min"`` for ``metric``.
        epochs: epochs of one training.
        families: the uniform norm families valid there, for the uniform grid.
    """

    name: str
    model: Callable[[], pl.LightningModule]
    data: Callable[[int], pl.LightningDataModule]
    batch_size: int
    metric: str = "val_acc"
    mode: str = "max"
    epochs: int = 3
    families: tuple[str, ...] = ()


#: Families of the uniform grid on channels-first (conv) slots.
CONV_FAMILIES = ("batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm", "dyt")
#: Families offered on a decoder LM's slots (statistics over time would see future tokens).
LM_FAMILIES = ("rmsnorm", "layernorm", "dyt")

TASKS: dict[str, Task] = {
    "cnn2d-b2": Task(
        "ResNet-style 2-D CNN (14 slots), contrast-jittered digits, batch 2",
        ResNet2d,
        lambda b: TensorDataModule(make_digits, b),
        batch_size=2,
        epochs=3,
        families=CONV_FAMILIES,
    ),
    "unet3d-b2": Task(
        "3-D UNet (10 slots), synthetic spheres among cubes, batch 2, val Dice",
        UNet3d,
        lambda b: TensorDataModule(make_volumes, b),
        batch_size=2,
        epochs=6,
        families=CONV_FAMILIES,
    ),
    "llama-lm": Task(
        "Llama-style 2-layer LM (5 RMSNorm slots), rule sequences, batch 16",
        LlamaLM,
        lambda b: TensorDataModule(make_sequences, b),
        batch_size=16,
        epochs=2,
        families=LM_FAMILIES,
    ),
}


# -- measuring the uniform families ------------------------------------------------------------


def measure(keys: list[str], seeds: int) -> dict[str, dict[str, list[float]]]:
    """Train every task with its own norms and each uniform family, ``seeds`` seeds each;
    prints one line per (task, family) and returns ``{task: {family: [values]}}``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import autonorm
    from benchmarks.bench_search import train, uniform_config

    results: dict[str, dict[str, list[float]]] = {}
    for key in keys:
        task = TASKS[key]
        slots = autonorm.find_slots(task.model())
        print(f"\n== {key}: {task.name}, {len(slots)} slots, {task.epochs} epochs", flush=True)
        results[key] = {}
        for family in ("own", *task.families):
            config = None if family == "own" else uniform_config(slots, family)
            values, start = [], time.perf_counter()
            for seed in range(seeds):
                values.append(train(task, config, task.epochs, seed))  # type: ignore[arg-type]
            seconds = (time.perf_counter() - start) / seeds
            results[key][family] = values
            spread = statistics.stdev(values) if seeds > 1 else 0.0
            print(
                f"  {family:12s} {100 * statistics.mean(values):5.1f} ± {100 * spread:4.1f}"
                f"   {seconds:5.1f} s a training   {[round(100 * v, 1) for v in values]}",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Uniform norm families on the search tasks.")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per family")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    results = measure(args.tasks, args.seeds)
    families = [f for f in ("own", *CONV_FAMILIES) if any(f in r for r in results.values())]
    print("\n| task | " + " | ".join(families) + " |")
    print("|---" * (len(families) + 1) + "|")
    for key, row in results.items():
        cells = [f"{100 * statistics.mean(row[f]):.1f}" if f in row else "-" for f in families]
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
