"""Learn the normalization of every slot in one training run: the AutoNorm callback alone.

Every BatchNorm slot of the MNIST-1D CNN becomes a SwitchableNorm mixing instance, layer and
batch statistics; the mixing weights train with the model (at its learning rate, no weight
decay: at a tenth of it, as Sparse SN trains them, they stay within 0.31 to 0.36 of a uniform
third in this short run). At the end the callback derives a discrete per-slot config by
perturbation on the validation data, swaps in the chosen native layers (``finalize=True``,
kept only if the validation metric holds) and writes the config as YAML.

Run from the repository root::

    python examples/learn_switchable.py --epochs 3 --batch-size 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from autonorm.callbacks import AutoNorm  # noqa: E402
from examples.mnist1d_cnn.data import MNIST1DDataModule  # noqa: E402
from examples.mnist1d_cnn.model import MNIST1DCNN  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="per-device training batch")
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--out", default="runs/learn_switchable")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = MNIST1DCNN()
    data = MNIST1DDataModule(batch_size=args.batch_size, train_fraction=args.train_fraction)
    callback = AutoNorm(
        mode="learn",
        mixing_weight_decay=0.0,
        finalize=True,
        config_path=Path(args.out) / "learned_config.yaml",
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, datamodule=data)

    print("learned mix per slot (mean weights):")
    last = callback.mixing_history[-1]["weights"]
    for slot, weights in last.items():
        mix = ", ".join(f"{name} {w:.2f}" for name, w in weights["mean"].items())
        print(f"  {slot:24s} {mix}")
    print("derived config:")
    for slot, choice in callback.config.choices.items():
        print(f"  {slot:24s} {choice.label}")
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    print(f"val_acc of the finalized model: {metrics['val_acc']:.3f}")
    print(f"config written to {callback.resolved_config_path(trainer)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
