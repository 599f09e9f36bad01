"""Forward+backward time and saved-activation memory of every registry norm.

Each layer runs in training mode on the same input; times are the best (``--stat median``:
the median) of ``--reps`` steps after ``--warmup`` steps, with the layers interleaved step by
step in one process so that a change in machine load hits them alike; on a loaded machine the
best step is the one least disturbed. Ratios are to the native baselines measured in the same run:
``nn.BatchNorm2d`` for conv maps, ``nn.LayerNorm`` and batch norm over flattened tokens
(``nn.BatchNorm1d``) for tokens. "naive SN" is Switchable Normalization written with plain
autograd ops (the paper's formulas), as a reference for ``SwitchableNorm``.

Saved bytes: the unique storages autograd keeps for the backward (via
``torch.autograd.graph.saved_tensors_hooks``), the layer's own parameters and buffers left out.

Usage::

    python -m benchmarks.bench_norms            # (32, 64, 56, 56) and (32, 196, 384)
    python -m benchmarks.bench_norms --quick    # small shapes, a few seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autonorm.norms import CHANNELS_FIRST, CHANNELS_LAST, NORM_NAMES, create_norm


class NaiveSwitchableNorm(nn.Module):
    """Switchable Normalization with plain autograd ops, as the paper writes it.

    Channels-first mixes IN/LN/BN of ``(N, C, *)``; channels-last mixes LN/RMS/BN of
    ``(..., C)``. Autograd keeps every intermediate it needs for the backward.
    """

    def __init__(self, num_features: int, layout: str, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.layout = layout
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == CHANNELS_FIRST:
            h = x.reshape(x.shape[0], x.shape[1], -1)
            mean_in = h.mean(2, keepdim=True)
            var_in = h.var(2, keepdim=True, unbiased=False)
            mean_ln = mean_in.mean(1, keepdim=True)
            var_ln = (var_in + mean_in.square()).mean(1, keepdim=True) - mean_ln.square()
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = (var_in + mean_in.square()).mean(0, keepdim=True) - mean_bn.square()
            means, variances = (mean_in, mean_ln, mean_bn), (var_in, var_ln, var_bn)
            shape, count = (1, -1, 1), h.shape[0] * h.shape[2]
        else:
            h = x.reshape(-1, x.shape[-1])
            mean_ln = h.mean(1, keepdim=True)
            var_ln = h.var(1, keepdim=True, unbiased=False)
            var_rms = h.square().mean(1, keepdim=True)
            mean_bn = h.mean(0, keepdim=True)
            var_bn = h.var(0, keepdim=True, unbiased=False)
            means, variances = (
                (mean_ln, torch.zeros_like(mean_ln), mean_bn),
                (var_ln, var_rms, var_bn),
            )
            shape, count = (1, -1), h.shape[0]
        with torch.no_grad():
            unbiased = var_bn.flatten() * (count / (count - 1))
            self.running_mean.lerp_(mean_bn.flatten(), self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
        mean_w = torch.softmax(self.mean_weight, 0)
        var_w = torch.softmax(self.var_weight, 0)
        mean = sum(w * m for w, m in zip(mean_w, means, strict=True))
        var = sum(w * v for w, v in zip(var_w, variances, strict=True))
        out = (h - mean) / torch.sqrt(var + self.eps)
        out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.reshape(x.shape)


class FlatBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over ``(..., C)`` tokens flattened to ``(M, C)``: the BN baseline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@dataclass
class Case:
    title: str
    shape: tuple[int, ...]
    layout: str
    baselines: tuple[tuple[str, Callable[[int], nn.Module]], ...]


def _cases(quick: bool) -> list[Case]:
    conv = (8, 32, 28, 28) if quick else (32, 64, 56, 56)
    tokens = (8, 49, 128) if quick else (32, 196, 384)
    return [
        Case("conv2d", conv, CHANNELS_FIRST, (("nn.BatchNorm2d", nn.BatchNorm2d),)),
        Case(
            "tokens",
            tokens,
            CHANNELS_LAST,
            (("nn.LayerNorm", nn.LayerNorm), ("BN over tokens", FlatBatchNorm)),
        ),
    ]


def _layers(case: Case, device: torch.device) -> list[tuple[str, nn.Module]]:
    channels = case.shape[1] if case.layout == CHANNELS_FIRST else case.shape[-1]
    layers = [(label, make(channels)) for label, make in case.baselines]
    for name in NORM_NAMES:
        layer = create_norm(name, channels, layout=case.layout, input_ndim=len(case.shape))
        layers.append((f"{name} ({type(layer).__name__})", layer))
    layers.append(("naive SN (plain autograd)", NaiveSwitchableNorm(channels, case.layout)))
    return [(label, layer.to(device).train()) for label, layer in layers]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    """One forward+backward; returns (forward seconds, forward+backward seconds)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    out = layer(x)
    _sync(device)
    forward = time.perf_counter() - start
    out.backward(grad)
    _sync(device)
    return forward, time.perf_counter() - start


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for the backward, parameters excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    del out
    return sum(saved.values())


@dataclass
class Row:
    label: str
    forward_s: float
    total_s: float
    saved_bytes: int


STATS: dict[str, Callable[[Sequence[float]], float]] = {"best": min, "median": statistics.median}


def run_case(
    case: Case, device: torch.device, reps: int, warmup: int, stat: str = "best"
) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(device).requires_grad_()
    grad = torch.randn(case.shape, generator=gen).to(device)
    layers = _layers(case, device)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in layers}
    for rep in range(warmup + reps):
        for label, layer in layers:  # interleaved: load changes hit every layer alike
            result = _step(layer, x, grad, device)
            if rep >= warmup:
                times[label].append(result)
    return [
        Row(
            label,
            forward_s=STATS[stat]([t[0] for t in times[label]]),
            total_s=STATS[stat]([t[1] for t in times[label]]),
            saved_bytes=_saved_bytes(layer, x),
        )
        for label, layer in layers
    ]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:6.2f}x" if base > 0 else "     -"


def format_table(case: Case, rows: Sequence[Row], device: torch.device) -> str:
    names = [label for label, _ in case.baselines]
    bases = [next(row for row in rows if row.label == name) for name in names]
    head = f"{'layer':<42} {'fwd ms':>8} {'fwd+bwd ms':>11}"
    head += "".join(f" {'vs ' + n:>16}" for n in names)
    head += f" {'saved MiB':>10}" + "".join(f" {'vs ' + n:>16}" for n in names)
    where = device.type
    if device.type == "cpu":
        where += f", {torch.get_num_threads()} threads"
    elif device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    lines = [f"{case.title} {tuple(case.shape)} float32 {case.layout}, {where}", head]
    lines.append("-" * len(head))
    for row in rows:
        line = f"{row.label:<42} {row.forward_s * 1e3:8.2f} {row.total_s * 1e3:11.2f}"
        line += "".join(f" {_ratio(row.total_s, b.total_s):>16}" for b in bases)
        line += f" {row.saved_bytes / 2**20:10.1f}"
        line += "".join(f" {_ratio(row.saved_bytes, b.saved_bytes):>16}" for b in bases)
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Forward+backward time and saved-activation memory of every registry norm."
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed steps per layer (20; quick 5)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per layer first")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    parser.add_argument("--stat", choices=tuple(STATS), default="best", help="time statistic")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (5 if args.quick else 20)
    if reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    header = (
        f"torch {torch.__version__}, {args.stat} of {reps} interleaved steps after "
        f"{args.warmup} warmup steps"
    )
    if hasattr(os, "getloadavg"):
        header += f", load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    print(header)
    for device in devices:
        for case in _cases(args.quick):
            rows = run_case(case, device, reps, args.warmup, args.stat)
            print()
            print(format_table(case, rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
