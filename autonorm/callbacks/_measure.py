"""Measure training steps as they happen: activation bytes saved for backward, peak memory,
step time, parameter count.

On CUDA the peak comes from the caching allocator. On CPU there is no allocator peak to read, so
the peak is estimated honestly from a real training step: parameters + gradients + optimizer
state + the activation bytes autograd saved for backward (unique storages, counted with
``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autonorm._trial_keys import ACTIVATION_BYTES, MEMORY_METHOD, N_PARAMS, PEAK_MEMORY, STEP_TIME

#: What a training run measured, by trial attribute name (``n_params``, ``peak_memory``,
#: ``step_time``, ``memory_method``, ``activation_bytes``): plain values, stored as they are.
Measurements = dict[str, int | float | str]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class SavedTensorCounter:
    """Counts the bytes of the distinct storages autograd saves for backward while active.

    Parameters (and tensors given in ``exclude``) are not counted: they exist anyway.

    Example::

        >>> layer = nn.Linear(4, 4)
        >>> with SavedTensorCounter(exclude=layer.parameters()) as counter:
        ...     _ = layer(torch.randn(2, 4, requires_grad=True)).sum()
        >>> counter.nbytes
        32
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # fake or functional tensors: no memory
            return tensor
        if ptr not in self._excluded and tensor.device.type != "meta":
            self._storages[ptr] = storage.nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None


def _optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    return tensor_bytes(
        value
        for opt in optimizers
        for state in opt.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


class TrainingStepRecorder:
    """Records step time and peak memory of the training steps of a running fit.

    Driven by the Lightning hooks: ``batch_start`` (before forward), ``forward_done`` (before
    backward), ``batch_end`` (after the optimizer step). Saved-activation bytes are measured on
    the first ``measure_steps`` steps only, so the hooks cost nothing afterwards.
    """

    def __init__(self, measure_steps: int = 1, timed_steps: int = 20) -> None:
        self.measure_steps = measure_steps
        self.timed_steps = timed_steps
        self.step_times: list[float] = []
        self.activation_bytes = 0
        self.peak_memory = 0
        self.method = "cpu-estimate"
        self.n_params = 0
        self._counter: SavedTensorCounter | None = None
        self._start = 0.0
        self._steps = 0

    def batch_start(self, module: nn.Module) -> None:
        device = next(module.parameters(), torch.empty(0)).device
        if device.type == "cuda" and self._steps == 0:
            torch.cuda.reset_peak_memory_stats(device)
        if self._steps < self.measure_steps and device.type != "cuda":
            self._counter = SavedTensorCounter(exclude=module.parameters())
            self._counter.__enter__()
        self._start = time.perf_counter()

    def forward_done(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.activation_bytes = max(self.activation_bytes, self._counter.nbytes)
            self._counter = None

    def batch_end(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.forward_done()  # manual optimization or a skipped backward
        device = next(module.parameters(), torch.empty(0)).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if len(self.step_times) < self.timed_steps:
            self.step_times.append(time.perf_counter() - self._start)
        params = list(module.parameters())
        self.n_params = sum(p.numel() for p in params)
        if device.type == "cuda":
            self.method = "cuda"
            self.peak_memory = max(self.peak_memory, int(torch.cuda.max_memory_allocated(device)))
        elif self._steps < self.measure_steps:
            param_bytes = tensor_bytes(params)
            grad_bytes = tensor_bytes(p.grad for p in params if p.grad is not None)
            grad_bytes = grad_bytes or tensor_bytes(p for p in params if p.requires_grad)
            estimate = (
                param_bytes
                + grad_bytes
                + _optimizer_state_bytes(optimizers)
                + self.activation_bytes
            )
            self.peak_memory = max(self.peak_memory, estimate)
        self._steps += 1

    def summary(self) -> Measurements:
        """Plain values: ``peak_memory`` (bytes), ``step_time`` (median s), ``n_params``,
        ``memory_method`` ("cuda" or "cpu-estimate"), ``activation_bytes``."""
        out: Measurements = {N_PARAMS: self.n_params, MEMORY_METHOD: self.method}
        if self._steps:
            out[PEAK_MEMORY] = self.peak_memory
            out[ACTIVATION_BYTES] = self.activation_bytes
        # skip the first (warm-up) step when there are others
        times = self.step_times[1:] or self.step_times
        if times:
            out[STEP_TIME] = statistics.median(times)
        return out


def first_batch_size(batch: Any) -> int | None:
    """The number of samples of a batch: the leading size of its first tensor, or None."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    items = list(batch.values()) if isinstance(batch, Mapping) else batch
    if isinstance(items, (list, tuple)):
        for item in items:
            size = first_batch_size(item)
            if size is not None:
                return size
    return None
