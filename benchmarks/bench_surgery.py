"""Surgery speed: find_slots (with the probe) and apply_config on a model with many norm slots.

The model is a deep stack of small Conv2d -> BatchNorm2d -> ReLU blocks (400 slots by default).
Each figure is the median of several runs after warmup; every run rewrites a fresh copy of the
model, and the copy is made outside the timed region.

Usage::

    python benchmarks/bench_surgery.py                  # 400 slots, 7 runs
    python benchmarks/bench_surgery.py --slots 1000 --runs 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from autonorm import NormConfig, apply_config, find_slots

#: Choices cycled through the slots for the mixed config (the first is the keep choice).
MIXED = (
    "batchnorm",
    "groupnorm(groups=4)",
    "layernorm",
    "rmsnorm",
    "instancenorm",
    "batchnorm(momentum=0.01)",
    "switchable",
    "dyt",
    "identity",
)


def build_model(num_slots: int, width: int) -> nn.Sequential:
    """``num_slots`` blocks of Conv2d(width, width, 3) -> BatchNorm2d -> ReLU."""
    blocks = []
    for _ in range(num_slots):
        blocks += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*blocks)


def median_time(
    template: nn.Module, work: Callable[[nn.Module], object], runs: int, warmup: int
) -> float:
    """Median seconds of ``work(fresh copy of template)``."""
    times = []
    for i in range(warmup + runs):
        model = copy.deepcopy(template)
        start = time.perf_counter()
        work(model)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=400, help="number of norm slots (400)")
    parser.add_argument("--width", type=int, default=8, help="channels per block (8)")
    parser.add_argument("--size", type=int, default=8, help="input height and width (8)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--target", type=float, default=0.5, help="target seconds (0.5)")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.runs < 1 or args.warmup < 0:
        print("--slots and --runs must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    template = build_model(args.slots, args.width)
    x = torch.randn(2, args.width, args.size, args.size)
    slots = find_slots(template, x)
    assert len(slots) == args.slots, len(slots)
    names = [s.name for s in slots]
    uniform = NormConfig.uniform(slots, "groupnorm", groups=4)
    mixed = NormConfig({name: MIXED[i % len(MIXED)] for i, name in enumerate(names)})

    def forward(model: nn.Module) -> None:
        with torch.no_grad():
            model.eval()(x)

    def apply(config: NormConfig) -> Callable[[nn.Module], object]:
        return lambda model: apply_config(model, config, example_input=x)

    def apply_found(config: NormConfig) -> Callable[[nn.Module], object]:
        return lambda model: apply_config(model, config, slots=slots)

    figures = [
        ("forward pass alone (reference)", forward),
        ("find_slots (probe)", lambda model: find_slots(model, x)),
        ("find_slots (no probe)", lambda model: find_slots(model, probe=False)),
        ("apply_config uniform groupnorm (slots given)", apply_found(uniform)),
        ("apply_config mixed (slots given)", apply_found(mixed)),
        ("find_slots + apply_config uniform groupnorm", apply(uniform)),
        ("find_slots + apply_config mixed", apply(mixed)),
    ]
    print(
        f"surgery on {args.slots} norm slots (Conv2d({args.width}, {args.width}, 3) -> "
        f"BatchNorm2d blocks, input {tuple(x.shape)}), torch {torch.__version__}, "
        f"{args.threads} thread(s), median of {args.runs} runs after {args.warmup} warmup"
    )
    width = max(len(label) for label, _ in figures)
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mixed config drops parameters (identity, rmsnorm)
        for label, work in figures:
            seconds = median_time(template, work, args.runs, args.warmup)
            if label.startswith("find_slots + "):
                worst = max(worst, seconds)
            print(f"  {label:<{width}}  {seconds * 1e3:8.1f} ms")
    verdict = "within" if worst < args.target else "OVER"
    print(f"slowest end-to-end: {worst:.3f} s ({verdict} the {args.target} s target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
