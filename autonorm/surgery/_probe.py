"""The probe: one forward pass with hooks that sees what each norm slot receives.

The pass runs in eval mode under no_grad, with train flags and buffers restored afterwards. It
records each slot's input shape (the layout is read from it), the input and output of slots
whose forward must be checked, and which Conv/Linear layer produced each slot's input (its
*feeder*). Running one module alone on random inputs, for the same checks without a probe, is
here too.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autonorm._errors import ProbeError
from autonorm.norms import CHANNELS_FIRST, CHANNELS_LAST

log = logging.getLogger(__name__)


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _to_device(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _describe(example_input: Any) -> str:
    if isinstance(example_input, torch.Tensor):
        return f"of shape {tuple(example_input.shape)}"
    if isinstance(example_input, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in example_input) + ")"
    if isinstance(example_input, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in example_input.items()) + "}"
    return type(example_input).__name__


def call_with_example(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` the way Lightning uses ``example_input_array``: a tuple is unpacked into
    positional arguments, a dict into keyword arguments, anything else is one argument."""
    example_input = _to_device(example_input, _device_of(model))
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


@dataclass
class Probe:
    """What one probe pass saw, keyed by slot module id."""

    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    io: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: slot module id -> the feeder name seen at each call (None: not a feeder's output)
    sources: dict[int, list[str | None]] = field(default_factory=dict)


def _pure_permutation(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` holds exactly ``base``'s elements with its dims reordered."""
    return (
        view.data_ptr() == base.data_ptr()
        and view.numel() == base.numel()
        and sorted(zip(view.shape, view.stride(), strict=True))
        == sorted(zip(base.shape, base.stride(), strict=True))
    )


class _Outputs:
    """The feeders' output tensors of a probe pass, held weakly: a tensor is a feeder's output
    when it is the very object the feeder returned (or a permuted view of it) and no in-place
    operation touched it since (its version counter is unchanged)."""

    def __init__(self) -> None:
        self.tensors: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.info: dict[int, tuple[str, int]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[id(tensor)] = tensor
        self.info[id(tensor)] = (name, tensor._version)

    def source(self, x: Any) -> str | None:
        if not isinstance(x, torch.Tensor):
            return None
        for candidate in (x, x._base):
            if candidate is None or self.tensors.get(id(candidate)) is not candidate:
                continue
            name, version = self.info[id(candidate)]
            if candidate._version == version and (
                candidate is x or _pure_permutation(x, candidate)
            ):
                return name
        return None


def run_probe(
    model: nn.Module,
    modules: dict[int, nn.Module],
    example_input: Any,
    record_io: set[int],
    feeders: dict[int, tuple[nn.Module, str]] | None = None,
) -> Probe:
    """One forward pass in eval mode under no_grad; train flags and buffers restored after.

    torch's fused transformer inference path is switched off for the pass: it would skip the
    norm modules (and turn padded batches into nested tensors, which have no shape).

    Args:
        model: the model to run.
        modules: the slot modules to watch, by id.
        example_input: the input, as :func:`call_with_example` takes it.
        record_io: ids of the slot modules whose input and output are kept.
        feeders: ``{id: (module, name)}`` of the Conv/Linear layers watched so that each slot's
            input can be traced to the layer that produced it.

    Raises:
        ProbeError: the forward pass failed.
    """
    probe = Probe()
    outputs = _Outputs()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        key = id(module)
        if key in probe.shapes or not args or not isinstance(args[0], torch.Tensor):
            return
        probe.shapes[key] = tuple(args[0].shape)
        if key in record_io and isinstance(output, torch.Tensor):
            probe.io[key] = (args[0].detach().clone(), output.detach().clone())

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        probe.sources.setdefault(id(module), []).append(outputs.source(args[0] if args else None))

    def feeder_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            outputs.add(feeder_names[id(module)], output)

    feeder_names = {key: name for key, (_, name) in (feeders or {}).items()}
    flags = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b is not None}
    handles = [m.register_forward_hook(hook) for m in modules.values()]
    handles += [m.register_forward_pre_hook(pre_hook) for m in modules.values()]
    handles += [m.register_forward_hook(feeder_hook) for m, _ in (feeders or {}).values()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            try:
                call_with_example(model, example_input)
            except Exception as err:
                raise ProbeError(
                    f"the probe forward pass of {type(model).__name__} with the example input "
                    f"{_describe(example_input)} failed: {type(err).__name__}: {err}; give an "
                    "example input the model accepts (example_input= or example_input_array)"
                ) from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for name, value in model.named_buffers():
                if name in buffers and value is not None:
                    value.copy_(buffers[name])
    return probe


def _other(layout: str) -> str:
    return CHANNELS_LAST if layout == CHANNELS_FIRST else CHANNELS_FIRST


def layouts_from_shape(shape: tuple[int, ...] | None, num_features: int, default: str) -> list[str]:
    """The layouts an input shape allows, most likely first: channels_first alone when only
    dim 1 is C, channels_last alone when only the last dim is C, else both (default first)."""
    if shape is not None and len(shape) >= 3:
        first, last = shape[1] == num_features, shape[-1] == num_features
        if first and not last:
            return [CHANNELS_FIRST]
        if last and not first:
            return [CHANNELS_LAST]
    return [default, _other(default)]


def synthetic_inputs(module: nn.Module, num_features: int, layout: str) -> list[torch.Tensor]:
    """Random inputs of the usual ranks for a layout, on the module's device and dtype."""
    factory: dict[str, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            factory = {"device": tensor.device, "dtype": tensor.dtype}
            break
    c = num_features
    shapes = (
        [(2, c, 3, 4), (2, c, 5), (2, c, 2, 3, 4)]
        if layout == CHANNELS_FIRST
        else [(2, 3, 4, c), (2, 5, c), (2, 2, 3, 4, c)]
    )
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(**factory) for shape in shapes]


def run_alone(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``module(x)`` in eval mode under no_grad, its train flags and buffers restored; None
    when it fails or returns no tensor."""
    flags = {m: m.training for m in module.modules()}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        module.eval()
        with torch.no_grad():
            out = module(x)
    except Exception as err:  # this input does not fit the module: try another
        log.debug(
            "%s rejected a synthetic input %s: %s", type(module).__name__, tuple(x.shape), err
        )
        return None
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return out if isinstance(out, torch.Tensor) else None
