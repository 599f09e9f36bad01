"""The Python API end to end: search the MNIST-1D CNN's norms, then apply the best config.

Run from the repository root (a few minutes on CPU)::

    python examples/search_mnist1d.py --trials 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import autonorm  # noqa: E402
from examples.mnist1d_cnn.data import MNIST1DDataModule  # noqa: E402
from examples.mnist1d_cnn.model import MNIST1DCNN  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="per-device batch to judge norms at"
    )
    parser.add_argument("--out", default="runs/search_mnist1d")
    args = parser.parse_args(argv)

    result = autonorm.search(
        MNIST1DCNN,
        MNIST1DDataModule(train_fraction=0.5),
        n_trials=args.trials,
        space="cnn",
        monitor="val_acc",
        mode="max",
        budget=autonorm.Budget(batch_size=args.batch_size),
        trainer_kwargs={"max_epochs": args.epochs},
        out_dir=args.out,
        seed=0,
    )
    print(f"best val_acc {result.best_value:.3f} (trial {result.best_trial.number})")
    for slot, choice in result.best_config.choices.items():
        print(f"  {slot:20s} {choice.label}")
    model = autonorm.apply_config(MNIST1DCNN(), result.best_config)
    print(f"applied to a fresh model: output {tuple(model(torch.zeros(2, 1, 40)).shape)}")
    print(f"bundle: {result.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
