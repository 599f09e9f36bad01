"""Is the search worth its compute? autonorm against what a user would do anyway.

For each task (a model, its data, a per-device batch size, a metric) each method below finds a
config, counting its compute in trainings (one training = the task's epochs; screening, pruned
and learn epochs included); then every found config, and every uniform family, is retrained
from scratch with fresh seeds and judged by the mean of the metric (a search's own best value is
optimistic: the maximum of noisy runs).

Methods:
  own            the model's own norms (no search)
  uniform:<f>    each uniform family f (retrained: the best of them is the bar to clear)
  grid           one run per uniform family and the own norms, the best run kept (what a user
                 does by hand; its compute is the grid's size)
  random         random per-slot configs (no pruning) at the grid's compute
  learned-sn     one learned SwitchableNorm training (softmax mixing), its derived config
  learned-ssn    one learned Sparse SwitchableNorm training (SparsestMax), its derived config
                 (``--search-seed K`` trains them again with seed K)
  autonorm       autonorm.search with its defaults (staged plan, default budget = the grid's)
  autonorm+learn the same with warm_start="learn" (a learned SN run first) at the grid's
                 compute; autonorm+learn-sparse: warm_start="learn-sparse" (Sparse SN)

Acceptance (printed per task): autonorm at no more than the grid's compute retrains to at least
the best uniform family and the own norms (within 0.5 point or one seed std, whichever is
larger); averaged over the tasks it beats random; learned-ssn is within 2 points of the best
uniform family on the small-batch CNN tasks.

Run (each task in its own process; about 10 minutes a task on one core)::

    python benchmarks/bench_search.py --tasks cnn2d-b2 unet3d-b2
    python benchmarks/bench_search.py --tasks cnn2d-b2 --search-seed 1   # search again
    python benchmarks/bench_search.py --tasks cnn2d-b2 --compute-scale 2 # twice the compute
    python benchmarks/bench_search.py --report      # the table of every task run so far
    python benchmarks/bench_search.py --tasks cnn2d-b2 --evidence 0 1 2  # this version's
        # default search under search seeds 0, 1, 2 (and uniform SwitchableNorm), judged against
        # the bars of the task's saved run (its uniform families, own norms, grid, random)

Writes ``benchmarks/results/search/<task>.json`` and ``benchmarks/results/search.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autonorm  # noqa: E402
from autonorm.callbacks import AutoNorm  # noqa: E402
from autonorm.norms import default_groups  # noqa: E402
from autonorm.search import LEARN_MIXING_LR_SCALE  # noqa: E402
from benchmarks.search_tasks import TASKS as NEW_TASKS  # noqa: E402
from benchmarks.search_tasks import Task  # noqa: E402
from examples.digits_cnn.model import DigitsCNN, DigitsDataModule  # noqa: E402
from examples.mnist1d_cnn.data import MNIST1DDataModule  # noqa: E402
from examples.mnist1d_cnn.model import MNIST1DCNN  # noqa: E402
from examples.mnist1d_transformer.model import MNIST1DTransformer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONV = ("batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm", "dyt")
TOKENS = ("layernorm", "rmsnorm", "dyt", "batchnorm")
#: Tasks whose per-device batch is small enough for batch statistics to hurt (the SSN goal).
SMALL_BATCH_CNN = ("cnn2d-b2", "unet3d-b2", "digits-b4", "cnn1d-b4")

TASKS: dict[str, Task] = {
    **NEW_TASKS,
    "cnn1d-b4": Task(
        "MNIST-1D 1-D CNN, batch 4",
        MNIST1DCNN,
        lambda b: MNIST1DDataModule(batch_size=b, train_fraction=0.5),
        4,
        epochs=4,
        families=CONV,
    ),
    "transformer": Task(
        "MNIST-1D transformer, batch 32",
        MNIST1DTransformer,
        lambda b: MNIST1DDataModule(batch_size=b, train_fraction=0.5),
        32,
        epochs=4,
        families=TOKENS,
    ),
    "digits-b4": Task(
        "digits 2-D CNN, batch 4",
        DigitsCNN,
        lambda b: DigitsDataModule(batch_size=b),
        4,
        epochs=4,
        families=CONV,
    ),
}


@dataclass
class Found:
    """What a method found and what it cost."""

    method: str
    config: autonorm.NormConfig | None
    trainings: float
    seconds: float
    retrained: list[float] | None = None
    #: a search's trials per stage of the staged plan (screen, promote, refine, confirm)
    stages: dict[str, int] | None = None


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
    """Train from scratch with ``config`` (None: the model's own norms); the final metric."""
    pl.seed_everything(seed, verbose=False)
    callbacks = [] if config is None else [AutoNorm(config=config, record_metrics=False)]
    run = trainer(epochs, callbacks)
    run.fit(task.model(), datamodule=task.data(task.batch_size))
    return float(run.callback_metrics[task.metric])


def uniform_config(slots: list[autonorm.Slot], name: str) -> autonorm.NormConfig:
    """``name`` on every slot where it is valid (GroupNorm at its default group count); the
    slot's own layer elsewhere."""
    choices: dict[str, Any] = {}
    for slot in slots:
        params = {"groups": default_groups(slot.num_features, 8)} if name == "groupnorm" else {}
        valid = not slot.check({"name": name, **params})  # activations included (frn, evo)
        choices[slot.name] = {"name": name, **params} if valid else slot.keep_choice().to_value()
    return autonorm.NormConfig(choices, metadata={"source": f"uniform:{name}"})


def better(task: Task, a: float, b: float) -> bool:
    return a > b if task.mode == "max" else a < b


def run_grid(task: Task, slots: list[autonorm.Slot]) -> Found:
    """One run per uniform family and the own norms (seed 0), the best kept."""
    start, best = time.time(), None
    options = [("own", None)] + [(f, uniform_config(slots, f)) for f in task.families]
    for _, config in options:
        value = train(task, config, task.epochs, seed=0)
        if best is None or better(task, value, best[1]):
            best = (config, value)
    assert best is not None
    return Found("grid", best[0], grid_trainings(task), time.time() - start)


def grid_trainings(task: Task) -> float:
    """The grid's compute: one training of the own norms and of each family."""
    return float(1 + len(task.families))


def run_search(task: Task, method: str, **options: Any) -> Found:
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        result = autonorm.search(
            task.model,
            task.data(task.batch_size),
            monitor=task.metric,
            mode=task.mode,
            trainer_kwargs={"max_epochs": task.epochs},
            out_dir=out,
            **options,
        )
    compute = result.summary["compute"]
    stages: dict[str, int] = {}
    for trial in result.study.trials:
        stage = str(trial.user_attrs.get("stage", "sampler"))
        stages[stage] = stages.get(stage, 0) + 1
    seconds = time.time() - start
    return Found(method, result.best_config, compute["trainings"], seconds, stages=stages)


def run_learned(task: Task, method: str, seed: int = 0, **options: Any) -> Found:
    """One learned (Sparse) SwitchableNorm training seeded with ``seed``, its derived config."""
    pl.seed_everything(seed, verbose=False)
    start = time.time()
    options = {"mixing_lr_scale": LEARN_MIXING_LR_SCALE, "mixing_weight_decay": 0.0, **options}
    callback = AutoNorm(mode="learn", **options)
    with tempfile.TemporaryDirectory() as out:
        callback.config_path = Path(out) / "learned.yaml"
        trainer(task.epochs, [callback]).fit(task.model(), datamodule=task.data(task.batch_size))
    return Found(method, callback.config, 1.0, time.time() - start)


def run_random(task: Task, trainings: float, search_seed: int) -> Found:
    """Random per-slot configs, no pruning, at ``trainings`` of compute."""
    budget = {"batch_size": task.batch_size, "trainings": trainings}
    options = dict(sampler="random", pruner="none", warm_start=False, seed=1 + search_seed)
    return run_search(task, "random", budget=budget, **options)


def run_autonorm(task: Task, search_seed: int) -> Found:
    """autonorm.search with its defaults."""
    return run_search(task, "autonorm", budget={"batch_size": task.batch_size}, seed=search_seed)


def find_again(task: Task, search_seed: int) -> list[Found]:
    """The methods whose outcome depends on their own seed, run with another one (the learned
    paths' training seeded with it): how much of a difference is the luck of one search or of
    one learn pass."""
    trainings = grid_trainings(task)
    return [
        run_random(task, trainings, search_seed),
        run_learned(task, "learned-sn", seed=search_seed),
        run_learned(task, "learned-ssn", seed=search_seed, mixing="sparsestmax"),
        run_autonorm(task, search_seed),
    ]


def find_with_more_compute(task: Task, scale: float) -> list[Found]:
    """random and autonorm at ``scale`` times the grid's compute: what the staged plan does with
    room to refine (its moves borrow what the SwitchableNorm trials weighed highest)."""
    trainings = scale * grid_trainings(task)
    budget = {"batch_size": task.batch_size, "trainings": trainings}
    return [
        run_random(task, trainings, 0),
        run_search(task, "autonorm", budget=budget, seed=0),
    ]


def find_all(task: Task, slots: list[autonorm.Slot]) -> list[Found]:
    grid = run_grid(task, slots)
    budget = {"batch_size": task.batch_size}
    found = [Found("own", None, 0.0, 0.0)]
    found += [Found(f"uniform:{f}", uniform_config(slots, f), 0.0, 0.0) for f in task.families]
    found.append(grid)
    found.append(run_random(task, grid.trainings, 0))
    found.append(run_learned(task, "learned-sn"))
    found.append(run_learned(task, "learned-ssn", mixing="sparsestmax"))
    found.append(run_autonorm(task, 0))
    for warm_start in ("learn", "learn-sparse"):
        found.append(
            run_search(
                task,
                f"autonorm+{warm_start}",
                budget={**budget, "trainings": grid.trainings},
                warm_start=warm_start,
                seed=0,
            )
        )
    return found


def find_with_evidence(task: Task, slots: list[autonorm.Slot], search_seed: int) -> list[Found]:
    """This version's default search (continued promotions, paired seeds, the own norms'
    guard) under ``search_seed``; with seed 0 also uniform SwitchableNorm, a bar of its own."""
    found = [run_autonorm(task, search_seed)]
    if search_seed == 0:
        found.append(Found("uniform:switchable", uniform_config(slots, "switchable"), 0.0, 0.0))
    return found


def is_mix(config: autonorm.NormConfig | None) -> bool:
    """Whether a found config mixes normalizer families across its slots (a per-slot choice)."""
    if config is None:
        return False
    return len({choice.name for choice in config.choices.values()}) > 1


def summary_of(config: autonorm.NormConfig | None) -> str:
    if config is None:
        return "own norms"
    kinds: dict[str, int] = {}
    for choice in config.choices.values():
        kinds[choice.label] = kinds.get(choice.label, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(kinds.items()))


def bench_task(
    key: str,
    seeds: int,
    search_seed: int = 0,
    compute_scale: float | None = None,
    evidence: bool = False,
) -> dict[str, Any]:
    task = TASKS[key]
    slots = autonorm.find_slots(task.model())
    print(f"\n== {key}: {task.name}, {len(slots)} slots, {task.epochs} epochs", flush=True)
    rows = []
    if evidence:
        methods = find_with_evidence(task, slots, search_seed)
    elif compute_scale is not None:
        methods = find_with_more_compute(task, compute_scale)
    elif search_seed:
        methods = find_again(task, search_seed)
    else:
        methods = find_all(task, slots)
    for found in methods:
        rows.append(retrained_row(task, found, seeds))
    result = {"task": key, "name": task.name, "slots": len(slots), "epochs": task.epochs}
    result.update(rows=rows, mode=task.mode, seeds=seeds, search_seed=search_seed)
    if compute_scale is not None:
        result["compute_scale"] = compute_scale
    if evidence:
        result["evidence"] = True
    return result


def retrained_row(task: Task, found: Found, seeds: int) -> dict[str, Any]:
    """A found config retrained from scratch with the fresh seeds 1000.. (printed as well)."""
    values = [train(task, found.config, task.epochs, 1000 + s) for s in range(seeds)]
    row = {
        "method": found.method,
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if seeds > 1 else 0.0,
        "retrained": values,
        "trainings": found.trainings,
        "seconds": found.seconds,
        "config": summary_of(found.config),
        "mix": is_mix(found.config),
    }
    if found.stages is not None:
        row["stages"] = found.stages
    print(
        f"  {row['method']:15s} {100 * row['mean']:5.1f} ± {100 * row['std']:4.1f}   "
        f"compute {row['trainings']:4.1f} trainings   {row['seconds']:6.1f} s   "
        f"{row['config']}",
        flush=True,
    )
    return row


#: Random per-slot search at exactly the compute the default search spent (its evidence run).
MATCHED_RANDOM = "random@autonorm"


def add_matched_random(path: Path) -> None:
    """Random per-slot search at the compute autonorm's default search spent in the evidence
    run saved at ``path``, under that run's search seed; its config retrained with the same
    seeds; the row added to the file."""
    run = json.loads(path.read_text())
    task = TASKS[run["task"]]
    auto = next(r for r in run["rows"] if r["method"] == "autonorm")
    print(f"\n== {run['task']}: random at {auto['trainings']:.2f} trainings", flush=True)
    found = run_random(task, auto["trainings"], run["search_seed"])
    row = retrained_row(task, dataclasses.replace(found, method=MATCHED_RANDOM), run["seeds"])
    run["rows"] = [r for r in run["rows"] if r["method"] != MATCHED_RANDOM] + [row]
    path.write_text(json.dumps(run, indent=2))


def verdicts(result: dict[str, Any], auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """The acceptance checks of one task (``auto``: another autonorm row to judge against the
    task's bars, e.g. a search under another seed)."""
    rows = {r["method"]: r for r in result["rows"]}
    sign = 1.0 if result["mode"] == "max" else -1.0
    uniforms = [r for m, r in rows.items() if m.startswith("uniform:")]
    best_uniform = max(uniforms, key=lambda r: sign * r["mean"])
    auto = auto or rows["autonorm"]

    def at_least(bar: dict[str, Any]) -> bool:
        tolerance = max(0.005, bar["std"])
        return sign * (auto["mean"] - bar["mean"]) >= -tolerance

    out = {
        "best_uniform": best_uniform["method"],
        "autonorm_vs_best_uniform": sign * (auto["mean"] - best_uniform["mean"]),
        "autonorm_ok": at_least(best_uniform)
        and at_least(rows["own"])
        and auto["trainings"] <= rows["grid"]["trainings"] + 1e-9,
        "autonorm_minus_random": sign * (auto["mean"] - rows["random"]["mean"]),
        "ssn_gap": sign * (rows["learned-ssn"]["mean"] - best_uniform["mean"]),
    }
    if result["task"] in SMALL_BATCH_CNN:
        out["ssn_ok"] = out["ssn_gap"] >= -0.02
    return out


def report(
    results: list[dict[str, Any]],
    again: list[dict[str, Any]] | None = None,
    scaled: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        "| task | method | retrained (%) | compute (trainings) | config |",
        "|---|---|---|---|---|",
    ]
    checks = []
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['task']} | {row['method']} | {100 * row['mean']:.1f} ± "
                f"{100 * row['std']:.1f} | {row['trainings']:.1f} | {row['config']} |"
            )
        v = verdicts(result)
        ssn = f", SSN within 2 points: {v['ssn_ok']}" if "ssn_ok" in v else ""
        checks.append(
            f"- {result['task']}: autonorm {100 * v['autonorm_vs_best_uniform']:+.1f} points "
            f"against the best uniform ({v['best_uniform']}), "
            f"{100 * v['autonorm_minus_random']:+.1f} against random; goal held: "
            f"{v['autonorm_ok']}; SSN {100 * v['ssn_gap']:+.1f} points{ssn}"
        )
    if results:
        gain = statistics.mean(verdicts(r)["autonorm_minus_random"] for r in results)
        checks.append(f"- autonorm minus random, mean over tasks: {100 * gain:+.1f} points")
    text = "\n".join(lines) + "\n\nAcceptance:\n" + "\n".join(checks) + "\n"
    return text + search_seed_report(results, again or []) + scaled_report(results, scaled or [])


def seed_runs(result: dict[str, Any], again: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A task's seed-0 run and its runs under other search seeds, in seed order."""
    runs = [result] + [a for a in again if a["task"] == result["task"]]
    return sorted(runs, key=lambda r: r.get("search_seed", 0))


def search_seed_report(results: list[dict[str, Any]], again: list[dict[str, Any]]) -> str:
    """autonorm and random per search seed (each found config retrained with the same seeds),
    and their difference averaged over tasks and search seeds."""
    if not again:
        return ""
    lines = [
        "",
        "Search seeds (`--search-seed K`: random and autonorm searched again):",
        "",
        "| task | search seed | random | autonorm | autonorm − random | goal held |",
        "|---|---|---|---|---|---|",
    ]
    gains, held = [], []
    for result in results:
        for run in seed_runs(result, again):
            rows = {r["method"]: r for r in run["rows"]}
            sign = 1.0 if run["mode"] == "max" else -1.0
            gain = sign * (rows["autonorm"]["mean"] - rows["random"]["mean"])
            gains.append(gain)
            held.append(verdicts(result, rows["autonorm"])["autonorm_ok"])
            lines.append(
                f"| {run['task']} | {run.get('search_seed', 0)} | "
                + " | ".join(
                    f"{100 * rows[m]['mean']:.1f} ± {100 * rows[m]['std']:.1f} "
                    f"[{rows[m]['trainings']:.1f}] {rows[m]['config']}"
                    for m in ("random", "autonorm")
                )
                + f" | {100 * gain:+.1f} | {held[-1]} |"
            )
    lines.append(
        f"\nautonorm minus random, mean over tasks and search seeds: "
        f"{100 * statistics.mean(gains):+.1f} points ({len(gains)} searches each); autonorm at "
        f"least the best uniform norm and the own norms in {sum(held)} of {len(held)} searches"
    )
    return "\n".join(lines) + "\n" + learn_seed_report(results, again)


def learn_seed_report(results: list[dict[str, Any]], again: list[dict[str, Any]]) -> str:
    """The learned paths per seed of their training, against the task's best uniform norm:
    whether one learn pass's gap is the pass's luck or the method's."""
    lines = [
        "",
        "Learn seeds (the learned paths' training seeded with the search seed):",
        "",
        "| task | best uniform | seed | learned-sn | learned-ssn | SSN − best uniform |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for result in results:
        runs = seed_runs(result, again)
        runs = [r for r in runs if any(row["method"] == "learned-ssn" for row in r["rows"])]
        sign = 1.0 if result["mode"] == "max" else -1.0
        bar = {r["method"]: r for r in result["rows"]}[verdicts(result)["best_uniform"]]
        gaps, sn_gaps = [], []
        for run in runs:
            rows = {r["method"]: r for r in run["rows"]}
            gaps.append(sign * (rows["learned-ssn"]["mean"] - bar["mean"]))
            sn_gaps.append(sign * (rows["learned-sn"]["mean"] - bar["mean"]))
            lines.append(
                f"| {run['task']} | {100 * bar['mean']:.1f} ± {100 * bar['std']:.1f} "
                f"({bar['method']}) | {run.get('search_seed', 0)} | "
                + " | ".join(
                    f"{100 * rows[m]['mean']:.1f} ± {100 * rows[m]['std']:.1f} {rows[m]['config']}"
                    for m in ("learned-sn", "learned-ssn")
                )
                + f" | {100 * gaps[-1]:+.1f} |"
            )
        if len(gaps) > 1 and result["task"] in SMALL_BATCH_CNN:
            within = sum(g >= -0.02 for g in gaps)
            summary.append(
                f"- {result['task']}: SSN − best uniform {100 * statistics.mean(gaps):+.1f} points "
                f"on average over {len(gaps)} learn seeds, within 2 points in {within}; softmax "
                f"SN {100 * statistics.mean(sn_gaps):+.1f}, within 2 points in "
                f"{sum(g >= -0.02 for g in sn_gaps)}"
            )
    if not summary:
        return ""
    return "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n"


def scaled_report(results: list[dict[str, Any]], scaled: list[dict[str, Any]]) -> str:
    """random and autonorm with more compute than the grid's, against the task's bars."""
    if not scaled:
        return ""
    lines = [
        "",
        "More compute (`--compute-scale X`: random and autonorm at X times the grid's compute):",
        "",
        "| task | random | autonorm | autonorm's trials per stage | autonorm − random "
        "| autonorm − best uniform | autonorm − autonorm at the grid's compute |",
        "|---|---|---|---|---|---|---|",
    ]
    bars = {r["task"]: r for r in results}
    gains = []
    for run in sorted(scaled, key=lambda r: (r["task"], r["compute_scale"])):
        rows = {r["method"]: r for r in run["rows"]}
        sign = 1.0 if run["mode"] == "max" else -1.0
        auto, rand = rows["autonorm"], rows["random"]
        gains.append(sign * (auto["mean"] - rand["mean"]))
        cells = [
            f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} [{r['trainings']:.1f}] {r['config']}"
            for r in (rand, auto)
        ]
        stages = ", ".join(f"{k} {v}" for k, v in auto.get("stages", {}).items())
        bar = bars.get(run["task"])
        versus = "–", "–"
        if bar is not None:
            v = verdicts(bar, auto)
            default = {r["method"]: r for r in bar["rows"]}["autonorm"]
            versus = (
                f"{100 * v['autonorm_vs_best_uniform']:+.1f} ({v['best_uniform']})",
                f"{100 * sign * (auto['mean'] - default['mean']):+.1f}",
            )
        lines.append(
            f"| {run['task']} | {cells[0]} | {cells[1]} | {stages} | {100 * gains[-1]:+.1f} | "
            f"{versus[0]} | {versus[1]} |"
        )
    lines.append(
        f"\nautonorm minus random with more compute, mean over tasks: "
        f"{100 * statistics.mean(gains):+.1f} points"
    )
    return "\n".join(lines) + "\n"


def evidence_report(results: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """This version's default search per task and search seed, against the task's bars (the
    best uniform family or uniform SwitchableNorm, the own norms, the grid's pick, random)."""
    if not runs:
        return ""
    lines = [
        "",
        "Evidence-based search (`--evidence K ...`: continued promotions, paired seeds, the own "
        "norms kept without evidence):",
        "",
        "| task | search seed | autonorm [trainings] config | mix | − best uniform (incl. SN) "
        "| − own | − grid pick | − random (grid's compute) | − random (autonorm's compute) "
        "| goal held |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bars = {r["task"]: r for r in results}
    switchable = {
        r["task"]: row for r in runs for row in r["rows"] if row["method"] == "uniform:switchable"
    }
    held, versus_grid, versus_random, versus_matched, mixes = [], [], [], [], 0
    for run in sorted(runs, key=lambda r: (r["task"], r["search_seed"])):
        bar = bars.get(run["task"])
        if bar is None:
            continue
        rows = {r["method"]: r for r in bar["rows"]}
        sign = 1.0 if run["mode"] == "max" else -1.0
        auto = next(r for r in run["rows"] if r["method"] == "autonorm")
        matched = next((r for r in run["rows"] if r["method"] == MATCHED_RANDOM), None)
        uniforms = [r for m, r in rows.items() if m.startswith("uniform:")]
        if run["task"] in switchable:
            uniforms.append(switchable[run["task"]])
        best = max(uniforms, key=lambda r: sign * r["mean"])

        def gap(other: dict[str, Any], auto: dict[str, Any] = auto, sign: float = sign) -> float:
            return sign * (auto["mean"] - other["mean"])

        def at_least(other: dict[str, Any]) -> bool:
            return gap(other) >= -max(0.005, other["std"])

        ok = at_least(best) and at_least(rows["own"])
        ok = ok and auto["trainings"] <= rows["grid"]["trainings"] + 1e-9
        held.append(ok)
        versus_grid.append(gap(rows["grid"]))
        versus_random.append(gap(rows["random"]))
        if matched is not None:
            versus_matched.append(gap(matched))
        matched_cell = (
            "not run"
            if matched is None
            else f"{100 * gap(matched):+.1f} [{matched['trainings']:.1f}]"
        )
        mixes += bool(auto.get("mix"))
        lines.append(
            f"| {run['task']} | {run['search_seed']} | {100 * auto['mean']:.1f} ± "
            f"{100 * auto['std']:.1f} [{auto['trainings']:.1f}] {auto['config']} | "
            f"{'yes' if auto.get('mix') else 'no'} | {100 * gap(best):+.1f} ({best['method']}) | "
            f"{100 * gap(rows['own']):+.1f} | {100 * gap(rows['grid']):+.1f} | "
            f"{100 * gap(rows['random']):+.1f} | {matched_cell} | {ok} |"
        )
    if held:
        lines.append(
            f"\nGoal held in {sum(held)} of {len(held)} searches; autonorm minus the grid's pick "
            f"{100 * statistics.mean(versus_grid):+.1f} points and minus random "
            f"{100 * statistics.mean(versus_random):+.1f} points on average; {mixes} of "
            f"{len(held)} found configs are per-slot mixes"
        )
    if versus_matched:
        lines.append(
            f"autonorm minus random at autonorm's own compute: "
            f"{100 * statistics.mean(versus_matched):+.1f} points on average over "
            f"{len(versus_matched)} searches (`--matched-random`)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=[])
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds per config")
    parser.add_argument("--report", action="store_true", help="print the table of saved runs")
    parser.add_argument(
        "--search-seed",
        type=int,
        default=0,
        help="K > 0: only search again with random and autonorm under search seed K "
        "(written to <task>.search-seed<K>.json)",
    )
    parser.add_argument(
        "--compute-scale",
        type=float,
        default=None,
        help="X > 1: only random and autonorm at X times the grid's compute, search seed 0 "
        "(written to <task>.compute<X>x.json)",
    )
    parser.add_argument(
        "--evidence",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="only this version's default search under search seeds K (and uniform "
        "SwitchableNorm), judged against the task's saved run (written to "
        "<task>.evidence-seed<K>.json)",
    )
    parser.add_argument(
        "--matched-random",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="only random per-slot search at the compute autonorm spent in the saved evidence "
        "runs of search seeds K, retrained with the same seeds (added to those files)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.search_seed < 0:
        parser.error("--search-seed must be >= 0")
    if args.compute_scale is not None and args.compute_scale <= 1:
        parser.error("--compute-scale must be > 1 (1 is the default run)")
    if args.compute_scale is not None and args.search_seed:
        parser.error("--compute-scale runs search seed 0 only; drop --search-seed")
    folder = RESULTS / "search"
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for key in args.tasks if args.evidence is not None else []:
        for seed in args.evidence:
            result = bench_task(key, args.seeds, seed, evidence=True)
            (folder / f"{key}.evidence-seed{seed}.json").write_text(json.dumps(result, indent=2))
    for key in args.tasks if args.matched_random is not None else []:
        for seed in args.matched_random:
            add_matched_random(folder / f"{key}.evidence-seed{seed}.json")
    for key in args.tasks if args.evidence is None and args.matched_random is None else []:
        result = bench_task(key, args.seeds, args.search_seed, args.compute_scale)
        suffix = f".search-seed{args.search_seed}" if args.search_seed else ""
        if args.compute_scale is not None:
            suffix = f".compute{args.compute_scale:g}x"
        (folder / f"{key}{suffix}.json").write_text(json.dumps(result, indent=2))
    saved = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    evidence = [r for r in saved if r.get("evidence")]
    saved = [r for r in saved if not r.get("evidence")]
    scaled = [r for r in saved if r.get("compute_scale")]
    main_runs = [r for r in saved if not r.get("search_seed") and not r.get("compute_scale")]
    text = report(main_runs, [r for r in saved if r.get("search_seed")], scaled)
    text += evidence_report(main_runs, evidence)
    (RESULTS / "search.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
