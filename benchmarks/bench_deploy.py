"""Inference time of a model with its batch norms folded into their convs, against unfolded.

A ResNet-18-shaped CNN (BasicBlocks, BatchNorm2d after every conv) in eval mode, batch
``--batch`` at ``--size`` pixels. The two models run interleaved in one process, best of
``--reps`` forward passes each, so that a change in machine load hits both alike.

Usage::

    python -m benchmarks.bench_deploy            # batch 8, 112x112
    python -m benchmarks.bench_deploy --quick    # batch 2, 32x32
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autonorm import fold_norms


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks: list[nn.Module] = []
        cin = width
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.blocks(x).mean((2, 3)))


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics and affine away from their initial values, as after training."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.train()
        model(x)
    return model.eval()


def best_times(models: Sequence[nn.Module], x: torch.Tensor, reps: int) -> list[float]:
    """Best forward time of each model, interleaved."""
    best = [float("inf")] * len(models)
    with torch.inference_mode():
        for model in models:
            model(x)  # warm-up
        for _ in range(reps):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(x)
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Folded vs unfolded inference time.")
    parser.add_argument("--quick", action="store_true", help="batch 2 at 32x32, 5 reps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    batch, size, reps = (2, 32, 5) if args.quick else (args.batch, args.size, args.reps)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    model = _trained(ResNet18(), x)
    folded = fold_norms(copy.deepcopy(model), x)
    count = sum(fold.reason is None for fold in folded.autonorm_folds)
    with torch.no_grad():
        error = float((folded(x) - model(x)).abs().max())
    unfolded_s, folded_s = best_times([model, folded], x, reps)
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(
        f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads{load}; ResNet-18 "
        f"shape, batch {batch} at {size}x{size}, best of {reps} interleaved forwards"
    )
    print(f"folded {count} of {len(folded.autonorm_folds)} norms, max |difference| {error:.2e}")
    print(f"unfolded {unfolded_s * 1e3:8.2f} ms")
    print(f"folded   {folded_s * 1e3:8.2f} ms   ratio folded/unfolded {folded_s / unfolded_s:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
