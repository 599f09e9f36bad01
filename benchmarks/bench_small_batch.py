"""Do the small-batch choices win anywhere? Batch Renormalization, FRN + TLU and EvoNorm-S0 on the
small-batch tasks of :mod:`benchmarks.bench_search`.

Per task, against the bars of the task's saved run (``benchmarks/results/search/<task>.json``:
its own norms and earlier uniform families, retrained with the same fresh seeds 1000..):

  uniform:<f>   each of ``batchrenorm``, ``frn``, ``evonorm_s0`` on every slot where it is valid
                (``frn``/``evonorm_s0`` only where the slot's activation is known; the slot keeps
                its own layer elsewhere), retrained from scratch with the fresh seeds; a family
                valid on no slot is "not offered" (nothing to train)
  grid+small    the hand grid with those of the three that are offered (one run per family and
                the own norms, the best kept; its compute is its size)
  autonorm      this version's default search, whose space offers the three at these batches

Run (each task a few minutes on one core)::

    python -m benchmarks.bench_small_batch --tasks unet3d-b2 cnn2d-b2 digits-b4 cnn1d-b4
    python -m benchmarks.bench_small_batch --report

Writes ``benchmarks/results/small_batch/<task>.json`` and ``benchmarks/results/small_batch.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import warnings
from typing import Any

import optuna
import torch

import autonorm
from benchmarks.bench_search import (
    RESULTS,
    SMALL_BATCH_CNN,
    TASKS,
    Found,
    retrained_row,
    run_autonorm,
    run_grid,
    uniform_config,
)

#: The choices this benchmark adds to the small-batch tasks.
FAMILY = ("batchrenorm", "frn", "evonorm_s0")
FOLDER = RESULTS / "small_batch"


def bench(key: str, seeds: int) -> dict[str, Any]:
    task = TASKS[key]
    slots = autonorm.find_slots(task.model())
    offered = {f: sum(not s.check(f) for s in slots) for f in FAMILY}
    print(f"\n== {key}: {task.name}, {len(slots)} slots; valid on {offered}", flush=True)
    added = tuple(f for f in FAMILY if offered[f])  # a family valid nowhere is the own norms
    grid_task = dataclasses.replace(task, families=task.families + added)
    found = [
        Found(f"uniform:{f}", uniform_config(slots, f), 0.0, 0.0) for f in FAMILY if offered[f]
    ]
    found.append(dataclasses.replace(run_grid(grid_task, slots), method="grid+small"))
    found.append(run_autonorm(task, 0))
    rows = [retrained_row(task, f, seeds) for f in found]
    return {"task": key, "mode": task.mode, "seeds": seeds, "offered": offered, "rows": rows}


def _uses_family(config: str) -> list[str]:
    return [f for f in FAMILY if f in config]


def report(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| task | slots offered (brn / frn / evo) | own | best earlier uniform | "
        "uniform:batchrenorm | uniform:frn | uniform:evonorm_s0 | grid+small [trainings] pick "
        "| autonorm [trainings] pick |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wins = []
    for run in sorted(runs, key=lambda r: r["task"]):
        bars = json.loads((RESULTS / "search" / f"{run['task']}.json").read_text())
        saved = {r["method"]: r for r in bars["rows"]}
        rows = {r["method"]: r for r in run["rows"]}
        sign = 1.0 if run["mode"] == "max" else -1.0
        earlier = max(
            (r for m, r in saved.items() if m.startswith("uniform:")),
            key=lambda r: sign * r["mean"],
        )

        def cell(row: dict[str, Any]) -> str:
            return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"

        for f in FAMILY:
            row = rows.get(f"uniform:{f}")
            if (
                row is not None
                and run["offered"][f]
                and sign * (row["mean"] - earlier["mean"]) > max(0.005, earlier["std"], row["std"])
            ):
                wins.append(f"{run['task']}: uniform {f} {cell(row)} > {earlier['method']}")
        for method in ("grid+small", "autonorm"):
            used = _uses_family(rows[method]["config"])
            if used:
                wins.append(f"{run['task']}: {method} picked {', '.join(used)}")
        offered = " / ".join(str(run["offered"][f]) for f in FAMILY)
        lines.append(
            f"| {run['task']} | {offered} | {cell(saved['own'])} | {cell(earlier)} "
            f"({earlier['method']}) | "
            + " | ".join(
                cell(rows[f"uniform:{f}"]) if run["offered"][f] else "not offered" for f in FAMILY
            )
            + f" | {cell(rows['grid+small'])} [{rows['grid+small']['trainings']:.0f}] "
            f"{rows['grid+small']['config']} | {cell(rows['autonorm'])} "
            f"[{rows['autonorm']['trainings']:.1f}] {rows['autonorm']['config']} |"
        )
    verdict = (
        "Where they win (beyond the larger of 0.5 point and either std), or are picked:\n"
        + "\n".join(f"- {w}" for w in wins)
        if wins
        else "They win nowhere here: no uniform small-batch family beats the best earlier "
        "uniform family beyond noise, and no pick uses them."
    )
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=SMALL_BATCH_CNN, default=[])
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds per config")
    parser.add_argument("--report", action="store_true", help="only print the saved runs' table")
    args = parser.parse_args(argv)
    FOLDER.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for key in [] if args.report else args.tasks:
        (FOLDER / f"{key}.json").write_text(json.dumps(bench(key, args.seeds), indent=2))
    runs = [json.loads(p.read_text()) for p in sorted(FOLDER.glob("*.json"))]
    text = report(runs)
    (RESULTS / "small_batch.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
