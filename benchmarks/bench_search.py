"""Is the search worth its compute? autonorm against what a user would do anyway.

For each task (a model, its data and a per-device batch size) the methods below each get a
compute budget counted in training epochs, then the config each one found is retrained from
scratch with fresh seeds and judged on validation accuracy (a search's own best value is
optimistic: it is the maximum of noisy runs).

Methods:
  own      the model's own norms (no search; compute 0)
  recommend  autonorm.recommend: rules of practice for the per-device batch (compute 0)
  uniform  one run per uniform norm (batchnorm, groupnorm, layernorm, instancenorm, rmsnorm;
           a norm invalid for a slot falls back to layernorm there), the best one kept
  random   random per-slot configs, no pruning, at the uniform grid's epoch budget
  learned  one learned-SwitchableNorm run (AutoNorm learn mode) and its derived config
  autonorm autonorm.search with its defaults (TPE, median pruning, warm start), stopped once it
           has used the uniform grid's epoch budget
  autonorm+learn  the same with warm_start="learn" (its learned-SN run counts in the budget)

Run (about 15 minutes on 2 CPU cores)::

    python benchmarks/bench_search.py
    python benchmarks/bench_search.py --tasks cnn-b4 --seeds 3 --epochs 4

Writes ``benchmarks/results/search.md``, ``search.json`` and ``search.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autonorm  # noqa: E402
from autonorm.callbacks import AutoNorm  # noqa: E402
from autonorm.norms import check_choice, default_groups  # noqa: E402
from examples.digits_cnn.model import DigitsCNN, DigitsDataModule  # noqa: E402
from examples.mnist1d_cnn.data import MNIST1DDataModule  # noqa: E402
from examples.mnist1d_cnn.model import MNIST1DCNN  # noqa: E402
from examples.mnist1d_transformer.model import MNIST1DTransformer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNIFORM = ("batchnorm", "groupnorm", "layernorm", "instancenorm", "rmsnorm")
METRIC = "val_acc"


@dataclass
class Task:
    name: str
    model: Callable[[], pl.LightningModule]
    data: Callable[[int], pl.LightningDataModule]
    batch_size: int


TASKS = {
    "cnn-b4": Task(
        "MNIST-1D 1-D CNN, batch 4",
        MNIST1DCNN,
        lambda b: MNIST1DDataModule(batch_size=b, train_fraction=0.5),
        4,
    ),
    "cnn-b64": Task(
        "MNIST-1D 1-D CNN, batch 64",
        MNIST1DCNN,
        lambda b: MNIST1DDataModule(batch_size=b, train_fraction=0.5),
        64,
    ),
    "transformer": Task(
        "MNIST-1D transformer, batch 32",
        MNIST1DTransformer,
        lambda b: MNIST1DDataModule(batch_size=b, train_fraction=0.5),
        32,
    ),
    "digits": Task(
        "digits 2-D CNN, batch 4", DigitsCNN, lambda b: DigitsDataModule(batch_size=b), 4
    ),
}


@dataclass
class Outcome:
    method: str
    config: autonorm.NormConfig | None
    epochs: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (epochs so far, best so far)
    retrained: list[float] = field(default_factory=list)


def trainer(epochs: int, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=tempfile.gettempdir(),
    )


def train(task: Task, config: autonorm.NormConfig | None, epochs: int, seed: int) -> float:
    """Train from scratch with ``config`` (None: the model's own norms); final val accuracy."""
    pl.seed_everything(seed, verbose=False)
    callbacks = [] if config is None else [AutoNorm(config=config, record_metrics=False)]
    run = trainer(epochs, callbacks)
    run.fit(task.model(), datamodule=task.data(task.batch_size))
    return float(run.callback_metrics[METRIC])


def uniform_config(slots: list[autonorm.Slot], name: str) -> autonorm.NormConfig:
    choices = {}
    for slot in slots:
        params = {"groups": default_groups(slot.num_features, 8)} if name == "groupnorm" else {}
        valid = not check_choice(
            name, slot.num_features, layout=slot.layout, input_shape=slot.input_shape, **params
        )
        choices[slot.name] = {"name": name, **params} if valid else "layernorm"
    return autonorm.NormConfig(choices, metadata={"source": f"uniform:{name}"})


def run_uniform(task: Task, epochs: int) -> Outcome:
    slots = autonorm.find_slots(task.model())
    start, best, history, used = time.time(), None, [], 0
    for name in UNIFORM:
        config = uniform_config(slots, name)
        value = train(task, config, epochs, seed=0)
        used += epochs
        if best is None or value > best[1]:
            best = (config, value)
        history.append((used, best[1]))
    return Outcome("uniform", best[0], used, time.time() - start, history)


def run_search(task: Task, epochs: int, budget_epochs: int, **options: Any) -> Outcome:
    """autonorm.search stopped once its trials have trained ``budget_epochs`` epochs."""
    history: list[tuple[int, float]] = []

    def spent(study: optuna.Study) -> int:
        learn = (study.user_attrs.get("autonorm") or {}).get("learn_epochs", 0)
        return learn + sum(
            t.user_attrs.get("epochs", 0) for t in study.trials if t.state.is_finished()
        )

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        complete = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            history.append((spent(study), max(complete)))
        if spent(study) + epochs > budget_epochs:
            study.stop()

    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        result = autonorm.search(
            task.model,
            task.data(task.batch_size),
            n_trials=100,
            monitor=METRIC,
            mode="max",
            budget=autonorm.Budget(batch_size=task.batch_size),
            trainer_kwargs={"max_epochs": epochs},
            out_dir=out,
            callbacks=[stop_at_budget],
            **options,
        )
        used = spent(result.study)
    method = "random" if options.get("sampler") == "random" else "autonorm"
    if options.get("warm_start") == "learn":
        method = "autonorm+learn"
    return Outcome(method, result.best_config, used, time.time() - start, history)


def run_learned(task: Task, epochs: int) -> Outcome:
    pl.seed_everything(0, verbose=False)
    start = time.time()
    callback = AutoNorm(mode="learn", mixing_lr_scale=0.1, mixing_weight_decay=0.0)
    with tempfile.TemporaryDirectory() as out:
        callback.config_path = Path(out) / "learned.yaml"
        trainer(epochs, [callback]).fit(task.model(), datamodule=task.data(task.batch_size))
    return Outcome("learned", callback.config, epochs, time.time() - start)


def run_recommend(task: Task) -> Outcome:
    start = time.time()
    model = task.model()
    config = autonorm.recommend(
        autonorm.find_slots(model), autonorm.Budget(batch_size=task.batch_size)
    )
    return Outcome("recommend", config, 0, time.time() - start)


def bench_task(key: str, epochs: int, seeds: int) -> dict[str, Any]:
    task = TASKS[key]
    print(f"\n== {task.name}: {epochs} epochs a run, {seeds} retrain seeds", flush=True)
    outcomes = [Outcome("own", None, 0, 0.0), run_recommend(task)]
    outcomes.append(run_uniform(task, epochs))
    grid = outcomes[-1].epochs
    outcomes.append(
        run_search(task, epochs, grid, sampler="random", pruner="none", warm_start=False, seed=1)
    )
    outcomes.append(run_learned(task, epochs))
    outcomes.append(run_search(task, epochs, grid, seed=0))
    outcomes.append(run_search(task, epochs, grid, seed=0, warm_start="learn"))
    rows = []
    for outcome in outcomes:
        outcome.retrained = [train(task, outcome.config, epochs, 1000 + s) for s in range(seeds)]
        mean = statistics.mean(outcome.retrained)
        std = statistics.stdev(outcome.retrained) if seeds > 1 else 0.0
        summary = "own norms"
        if outcome.config is not None:
            kinds: dict[str, int] = {}
            for choice in outcome.config.choices.values():
                kinds[choice.label] = kinds.get(choice.label, 0) + 1
            summary = ", ".join(f"{k}×{v}" for k, v in sorted(kinds.items()))
        print(
            f"  {outcome.method:9s} retrained acc {100 * mean:5.1f} ± {100 * std:4.1f}   "
            f"search epochs {outcome.epochs:3d}   {outcome.seconds:6.1f} s   {summary}",
            flush=True,
        )
        rows.append(
            {
                "method": outcome.method,
                "mean": mean,
                "std": std,
                "retrained": outcome.retrained,
                "epochs": outcome.epochs,
                "seconds": outcome.seconds,
                "config": None if outcome.config is None else outcome.config.to_dict()["slots"],
                "history": outcome.history,
            }
        )
    return {"task": key, "name": task.name, "epochs_per_run": epochs, "rows": rows}


def write_results(results: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| task | method | retrained val acc (%) | search epochs | search time (s) |",
        "|---|---|---|---|---|",
    ]
    for task in results:
        for row in task["rows"]:
            lines.append(
                f"| {task['name']} | {row['method']} | {100 * row['mean']:.1f} ± "
                f"{100 * row['std']:.1f} | {row['epochs']} | {row['seconds']:.0f} |"
            )
    (RESULTS / "search.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install autonorm[examples])")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, task in zip(axes[0], results, strict=True):
        for index, row in enumerate(task["rows"]):
            color = f"C{index}"  # one colour per method: its search curve and retrained point
            if row["history"]:
                xs, ys = zip(*row["history"], strict=True)
                ys = [100 * y for y in ys]
                ax.step(xs, ys, where="post", color=color, alpha=0.4, linestyle="--")
            ax.errorbar(
                row["epochs"],
                100 * row["mean"],
                yerr=100 * row["std"],
                fmt="o",
                color=color,
                label=row["method"],
            )
        ax.set_title(task["name"])
        ax.set_xlabel("training epochs spent searching")
        ax.set_ylabel("val accuracy (%)")
    axes[0][-1].legend(fontsize=7, title="retrained (dots), search best (dashed)")
    fig.tight_layout()
    fig.savefig(RESULTS / "search.png", dpi=100)
    print(f"wrote {RESULTS / 'search.md'}, search.json, search.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training run")
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds per config")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the table and plot from search.json"
    )
    args = parser.parse_args(argv)
    if args.replot:
        write_results(json.loads((RESULTS / "search.json").read_text()))
        return 0
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = [bench_task(key, args.epochs, args.seeds) for key in args.tasks]
    write_results(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
