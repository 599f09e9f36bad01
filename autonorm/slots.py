"""Find the norm slots of a model: which modules normalize, their channels, layout and input shape.

A slot is a module that normalizes: torch's norm classes and their subclasses, autonorm's own
layers, a :class:`NormWithExtra` left by an earlier rewrite, and any class registered with
:func:`register_slot_type`. With an example input, one probe forward pass (eval mode, no grad,
forward hooks) records each slot's input shape; the layout is then read from the shape, not
from the class alone.

A subclass with a forward of its own (``LayerNorm2d`` permuting around ``nn.LayerNorm``, a
``BatchNormAct2d`` applying its ``act`` child) is checked: its registry kind rebuilt with its
weights, followed by its child modules, must reproduce its output on the probe's input (on small
random inputs without a probe). A slot that passes keeps the children on rewrite; one that
fails can only keep its layer (:attr:`Slot.extra` is None).

The probe also records each slot's *feeder*: the Conv/Linear layer whose output tensor is the
slot's input (the same tensor object, or a permuted view of it, unmodified in between), on which
a weight-side choice (``+ws``, ``+wn``) acts. Where the probe cannot see it, declare it.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from autonorm._errors import AutoNormError, ProbeError
from autonorm.config import NormChoice
from autonorm.norms import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    DyT,
    IdentityNorm,
    SwitchableNorm,
    check_choice,
)
from autonorm.norms.layers import check_layout
from autonorm.norms.switchable import DEFAULT_CANDIDATES
from autonorm.norms.weight import is_feeder, output_channels, tagged_slot, weight_norm_of

#: Model attribute declaring feeders the probe cannot see: ``{slot name: feeder name or None}``.
FEEDERS_ATTR = "autonorm_feeders"

log = logging.getLogger(__name__)


class NormWithExtra(nn.Module):
    """A norm followed by the extra steps of the subclass it replaced (activation, drop path).

    Model zoos fuse steps into norm subclasses (``BatchNormAct2d``: batch norm, then ``act``
    and ``drop`` children). When such a slot gets another norm, the new norm runs first and
    the original child modules after it, under their original names.

    Args:
        norm: the normalization layer.
        extra: ``(name, module)`` pairs run in order after ``norm``.
    """

    def __init__(self, norm: nn.Module, extra: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.norm = norm
        self.extra_names = tuple(name for name, _ in extra)
        for name, module in extra:
            self.add_module(name, module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.norm(input)
        for name in self.extra_names:
            out = getattr(self, name)(out)
        return out

    def extra_repr(self) -> str:
        return f"extra={self.extra_names}"


@dataclass(frozen=True)
class SlotType:
    """How to read a registered norm class: its registry kind, layout and channel count."""

    cls: type[nn.Module]
    kind: str
    layout: str
    num_features: Callable[[nn.Module], int | None]
    extra: tuple[str, ...] | None = None


_USER_TYPES: dict[type[nn.Module], SlotType] = {}


def _features_attr(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _features_normalized_shape(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        return None
    shape = tuple(shape)
    return shape[0] if len(shape) == 1 else None


def register_slot_type(
    cls: type[nn.Module],
    *,
    kind: str,
    layout: str = CHANNELS_FIRST,
    num_features: str | Callable[[nn.Module], int] = "num_features",
    extra: Sequence[str] | None = (),
) -> None:
    """Declare a norm class of your own as a slot type.

    Args:
        cls: the class (its subclasses are slots too).
        kind: the registry name closest to what it computes (``batchnorm``, ``layernorm``, ...):
            the slot's "keep" choice and the kind reported for it.
        layout: its default layout, when the probe cannot tell.
        num_features: attribute name or function giving the channel count.
        extra: names of child modules that run after the normalization (kept on rewrite); the
            rest of the class's forward is taken to be the normalization itself. None: let
            autonorm check, as for an unregistered subclass, that ``kind`` followed by the
            class's child modules reproduces its output, and refuse to rewrite it otherwise.
            A subclass that overrides ``forward`` again is always checked.

    Example::

        >>> class MyNorm(nn.LayerNorm):
        ...     pass
        >>> register_slot_type(MyNorm, kind="layernorm", layout="channels_last",
        ...                    num_features=lambda m: m.normalized_shape[0])
    """
    from autonorm.norms import get_spec

    get_spec(kind)
    check_layout(layout)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"`cls` must be an nn.Module subclass, got {cls!r}")
    reader = num_features if callable(num_features) else (lambda m, a=num_features: getattr(m, a))
    _USER_TYPES[cls] = SlotType(cls, kind, layout, reader, None if extra is None else tuple(extra))


def _builtin_type(module: nn.Module) -> tuple[str, str, int | None] | None:
    """``(kind, default layout, num_features)`` of a module autonorm knows, else None."""
    layout = getattr(module, "layout", None)
    if isinstance(module, SwitchableNorm):
        return "switchable", module.layout, module.num_features
    if isinstance(module, DyT):
        return "dyt", module.layout, module.num_features
    if isinstance(module, IdentityNorm):
        return "identity", module.layout, module.num_features
    if isinstance(module, nn.SyncBatchNorm):
        return "syncbatchnorm", layout or CHANNELS_FIRST, module.num_features
    if isinstance(module, _BatchNorm):
        return "batchnorm", layout or CHANNELS_FIRST, module.num_features
    if isinstance(module, _InstanceNorm):
        return "instancenorm", layout or CHANNELS_FIRST, module.num_features
    if isinstance(module, nn.GroupNorm):
        return "groupnorm", layout or CHANNELS_FIRST, module.num_channels
    if isinstance(module, nn.LayerNorm):
        return "layernorm", layout or CHANNELS_LAST, _features_normalized_shape(module)
    if isinstance(module, nn.RMSNorm):
        return "rmsnorm", layout or CHANNELS_LAST, _features_normalized_shape(module)
    return None


def _slot_type(module: nn.Module) -> tuple[str, str, int | None, tuple[str, ...] | None] | None:
    if isinstance(module, NormWithExtra):
        inner = _slot_type(module.norm)
        return None if inner is None else (*inner[:3], module.extra_names)
    for cls in type(module).__mro__:
        if cls in _USER_TYPES:
            entry = _USER_TYPES[cls]
            # the declaration covers the registered class's forward, not a subclass's override
            extra = entry.extra if type(module).forward is cls.forward else None
            return entry.kind, entry.layout, entry.num_features(module), extra
    found = _builtin_type(module)
    return None if found is None else (*found, None)


def _native_forward(module: nn.Module) -> bool:
    """Whether the module's forward is that of a torch or autonorm class (nothing extra)."""
    forward = type(module).forward
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return (
                cls.__module__.startswith(("torch.", "autonorm."))
                and vars(cls)["forward"] is forward
            )
    return True


def keep_choice_of(module: nn.Module, kind: str) -> NormChoice:
    """The registry choice that rebuilds ``module`` as it is (non-default settings included)."""
    norm = module.norm if isinstance(module, NormWithExtra) else module
    params: dict[str, Any] = {}
    eps = getattr(norm, "eps", None)
    if kind == "groupnorm":
        params["groups"] = norm.num_groups
    if kind == "switchable":
        if norm.candidates != DEFAULT_CANDIDATES[norm.layout]:
            params["candidates"] = list(norm.candidates)
        if norm.momentum != 0.1:
            params["momentum"] = norm.momentum
    if kind == "dyt" and norm.alpha_init != 0.5:
        params["alpha_init"] = norm.alpha_init
    if kind in ("batchnorm", "syncbatchnorm", "instancenorm"):
        if norm.momentum != 0.1:
            params["momentum"] = norm.momentum
        default_tracking = kind != "instancenorm"
        if norm.track_running_stats != default_tracking:
            params["track_running_stats"] = norm.track_running_stats
    if kind in ("batchnorm", "syncbatchnorm", "groupnorm", "instancenorm", "switchable", "dyt"):
        affine = bool(getattr(norm, "affine", True))
    elif kind in ("layernorm", "rmsnorm"):
        affine = bool(getattr(norm, "elementwise_affine", True))
    else:
        affine = True
    if not affine:
        params["affine"] = False
    if kind != "identity" and kind != "dyt" and eps is not None and eps != 1e-5:
        params["eps"] = float(eps)
    return NormChoice(kind, params)


@dataclass(frozen=True)
class Slot:
    """One norm slot of a model.

    Attributes:
        name: dotted module path, as ``named_modules()`` gives it (the first one for a module
            registered at several places).
        kind: registry name of the layer in the slot (``batchnorm``, ``layernorm``, ...).
        num_features: channel count C.
        layout: ``"channels_first"`` (``(N, C, *)``) or ``"channels_last"`` (``(..., C)``).
        input_shape: input shape seen by the probe, or None.
        module_class: qualified class name of the layer in the slot.
        aliases: other names of the same module (a shared module is one slot).
        extra: child modules run after the norm (a fused subclass), kept on rewrite; None
            when the slot's forward does more than autonorm can reproduce.
        reached: whether the probe reached the slot (None without a probe).
        feeder: dotted name of the Conv/Linear layer whose output is the slot's input (the
            layer a weight-side choice ``+ws``/``+wn`` acts on), or None: the input comes from
            elsewhere (an add, an activation), from several places, or is unknown.
    """

    name: str
    kind: str
    num_features: int
    layout: str
    input_shape: tuple[int, ...] | None = None
    module_class: str = ""
    aliases: tuple[str, ...] = ()
    extra: tuple[str, ...] | None = ()
    reached: bool | None = None
    feeder: str | None = None
    keep: NormChoice | None = field(default=None, compare=False, repr=False)
    refusal: str | None = field(default=None, compare=False, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the slot's module."""
        return (self.name, *self.aliases)

    def keep_choice(self) -> NormChoice:
        """The choice that keeps the slot's layer as it is (with the weight-side part its
        feeder carries, if any)."""
        return self.keep if self.keep is not None else NormChoice(self.kind)

    def check(self, choice: NormChoice | str | Mapping[str, Any]) -> list[str]:
        """Everything that keeps ``choice`` from working on this slot (empty: valid).

        The norm layer is checked with :func:`autonorm.norms.check_choice` unless the choice
        keeps the slot's layer; a weight-side part needs a feeder.

        Example::

            >>> slot = Slot("bn", "batchnorm", 8, "channels_first", (2, 8, 4, 4))
            >>> slot.check("groupnorm(groups=3)+ws")  # doctest: +NORMALIZE_WHITESPACE
            ['`groups` must divide num_features, got groups=3, num_features=8',
             "ws needs the Conv/Linear layer that feeds the slot, and its input does not come
              straight from one (declare it: find_slots(..., feeders={'bn': '<layer name>'}))"]
        """
        choice = NormChoice.parse(choice)
        keep = self.keep_choice()
        problems = []
        if choice.base != keep.base:
            problems += check_choice(
                choice.name,
                self.num_features,
                layout=self.layout,
                input_shape=self.input_shape,
                **choice.params,
            )
        if choice.weight != keep.weight and choice.weight is not None and self.feeder is None:
            problems.append(
                f"{choice.weight} needs the Conv/Linear layer that feeds the slot, and its input "
                "does not come straight from one (declare it: "
                f"find_slots(..., feeders={{{self.name!r}: '<layer name>'}}))"
            )
        return problems

    @property
    def input_ndim(self) -> int | None:
        return None if self.input_shape is None else len(self.input_shape)


def _other(layout: str) -> str:
    return CHANNELS_LAST if layout == CHANNELS_FIRST else CHANNELS_FIRST


def _layouts_from_shape(
    shape: tuple[int, ...] | None, num_features: int, default: str
) -> list[str]:
    """The layouts an input shape allows, most likely first: channels_first alone when only
    dim 1 is C, channels_last alone when only the last dim is C, else both (default first)."""
    if shape is not None and len(shape) >= 3:
        first, last = shape[1] == num_features, shape[-1] == num_features
        if first and not last:
            return [CHANNELS_FIRST]
        if last and not first:
            return [CHANNELS_LAST]
    return [default, _other(default)]


def _matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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
class _Probe:
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


def _run_probe(
    model: nn.Module,
    modules: dict[int, nn.Module],
    example_input: Any,
    record_io: set[int],
    feeders: dict[int, tuple[nn.Module, str]] | None = None,
) -> _Probe:
    """One forward pass in eval mode under no_grad; train flags and buffers restored after.

    torch's fused transformer inference path is switched off for the pass: it would skip the
    norm modules (and turn padded batches into nested tensors, which have no shape).
    ``feeders`` (id -> (module, name)) are watched so that each slot's input can be traced to
    the layer that produced it.
    """
    probe = _Probe()
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


def _synthetic_inputs(module: nn.Module, num_features: int, layout: str) -> list[torch.Tensor]:
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


def _run_alone(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
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


def _reproduces(
    module: nn.Module,
    num_features: int,
    keep: NormChoice,
    layout: str,
    x: torch.Tensor,
    y: torch.Tensor,
    extra: tuple[str, ...],
) -> bool:
    """Whether the keep choice (rebuilt with the module's weights) then ``extra`` maps ``x`` to
    ``y``, the module's own output."""
    from autonorm.surgery import build_replacement

    try:
        rebuilt = build_replacement(
            module, keep, layout=layout, input_ndim=x.dim(), extra=None, num_features=num_features
        )
        rebuilt.eval()
        with torch.no_grad():
            out = rebuilt(x)
            for name in extra:
                out = getattr(module, name)(out)
    except Exception as err:  # a rebuild that cannot even run does not reproduce it
        log.debug("rebuilding %s as %s failed: %s", type(module).__name__, keep.label, err)
        return False
    low_precision = y.dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (1e-2, 1e-3) if low_precision else (1e-4, 1e-5)
    return out.shape == y.shape and torch.allclose(out, y, rtol=rtol, atol=atol)


def _check_custom(
    module: nn.Module,
    keep: NormChoice,
    layouts: list[str],
    num_features: int,
    io: tuple[torch.Tensor, torch.Tensor] | None,
    extra: tuple[str, ...],
) -> str | None:
    """The first of ``layouts`` under which the keep choice then ``extra`` reproduces a custom
    forward: on the probe's input when there is one, else on synthetic inputs. None: none does."""
    for layout in layouts:
        if io is not None:
            pairs = [io]
        else:
            inputs = _synthetic_inputs(module, num_features, layout)
            pairs = [(x, y) for x in inputs if (y := _run_alone(module, x)) is not None]
        if any(_reproduces(module, num_features, keep, layout, x, y, extra) for x, y in pairs):
            return layout
    return None


def find_slots(
    model: nn.Module,
    example_input: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    probe: bool = True,
    feeders: Mapping[str, str | None] | None = None,
) -> list[Slot]:
    """The norm slots of ``model``, in ``named_modules()`` order.

    Args:
        model: any ``nn.Module`` (a LightningModule included).
        example_input: input for one probe forward pass (a tensor, a tuple of positional
            arguments or a dict of keyword arguments). Default: the model's
            ``example_input_array`` when it has one. Without an input, layouts come from the
            classes (for a subclass with its own forward, from a check on random inputs) and
            ``input_shape`` is None.
        include: glob patterns on slot names; only matching slots are returned.
        exclude: glob patterns on slot names; matching slots are left out.
        probe: run the probe forward pass when an input is available (False: classes only).
        feeders: ``{slot name: layer name or None}`` declaring the Conv/Linear layer that feeds
            a slot where the probe cannot see it (None: the slot has no feeder). Default: the
            model's ``autonorm_feeders`` attribute, when it has one. Otherwise a slot's feeder
            is found by the probe; without one, from a weight-side normalization autonorm
            applied before, or from an ``nn.Sequential`` running a Conv/Linear right before it.

    Returns:
        One :class:`Slot` per norm module (a module shared at several places is one slot).

    Raises:
        AutoNormError: a declared feeder that is not a Conv/Linear layer of the model with the
            slot's channel count, or that names no slot.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> [(s.name, s.kind, s.layout) for s in find_slots(model, torch.zeros(2, 3, 8, 8))]
        [('1', 'batchnorm', 'channels_first')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if not probe:
        example_input = None
    found: dict[
        int, tuple[nn.Module, list[str], tuple[str, str, int | None, tuple[str, ...] | None]]
    ] = {}
    inside: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        parts = name.split(".")
        if name and (
            "" in inside or any(".".join(parts[:i]) in inside for i in range(1, len(parts)))
        ):
            continue  # children of a slot (a fused norm's activation) are not slots
        key = id(module)
        if key in found:
            found[key][1].append(name)
            inside.add(name)
            continue
        info = _slot_type(module)
        if info is None:
            continue
        if info[2] is None:
            warnings.warn(
                f"{name or type(module).__name__}: {type(module).__name__} normalizes over several "
                "dimensions (normalized_shape has more than one entry); it is not treated as a slot",
                stacklevel=2,
            )
            continue
        found[key] = (module, [name], info)
        inside.add(name)
    if feeders is None:
        feeders = getattr(model, FEEDERS_ATTR, None)
    declared = _declared_feeders(model, feeders, found)
    if include is not None or exclude is not None:
        found = {
            k: v
            for k, v in found.items()
            if (include is None or any(_matches(n, include) for n in v[1]))
            and not any(_matches(n, exclude) for n in v[1])
        }
    custom = {k for k, (m, _, info) in found.items() if info[3] is None and not _native_forward(m)}
    feeder_modules = {
        id(m): (m, name) for name, m in model.named_modules() if name and is_feeder(m)
    }
    probed = None
    if example_input is not None and found:
        probed = _run_probe(
            model,
            {k: v[0] for k, v in found.items()},
            example_input,
            custom,
            feeders=feeder_modules,
        )
    tagged = _tagged_feeders(feeder_modules)
    slots = []
    unreached = []
    for key, (module, names, (kind, default_layout, num_features, extra)) in found.items():
        shape = probed.shapes.get(key) if probed is not None else None
        layouts = _layouts_from_shape(shape, num_features, default_layout)
        layout = layouts[0]
        keep = keep_choice_of(module, kind)
        feeder = _feeder_of(model, names, int(num_features), key, probed, declared, tagged)
        if feeder is not None:
            keep = keep.with_weight(weight_norm_of(model.get_submodule(feeder)))
        refusal = None
        if extra is None:
            if key in custom:
                children = tuple(n for n, _ in module.named_children())
                io = probed.io.get(key) if probed is not None else None
                checked = _check_custom(module, keep, layouts, num_features, io, children)
                if checked is not None:
                    layout, extra = checked, children
                else:
                    tried = "the probe's input" if io is not None else "synthetic inputs"
                    refusal = (
                        f"its forward ({type(module).__qualname__}) does more than {kind} followed "
                        f"by its child modules {list(children)} (checked on {tried}), and autonorm "
                        "cannot reproduce it; keep it, or declare what runs after the norm with "
                        "autonorm.register_slot_type(..., extra=[...])"
                    )
            else:
                extra = ()
        if probed is not None and shape is None:
            unreached.append(names[0])
        slots.append(
            Slot(
                name=names[0],
                kind=kind,
                num_features=int(num_features),
                layout=layout,
                input_shape=shape,
                module_class=f"{type(module).__module__}.{type(module).__qualname__}",
                aliases=tuple(names[1:]),
                extra=extra if refusal is None else None,
                reached=None if probed is None else shape is not None,
                feeder=feeder,
                keep=keep,
                refusal=refusal,
            )
        )
    if unreached:
        warnings.warn(
            f"the probe forward pass did not reach {len(unreached)} norm slot(s): {unreached[:10]}"
            f"{' ...' if len(unreached) > 10 else ''}; their layouts come from their classes",
            stacklevel=2,
        )
    return slots


def _declared_feeders(
    model: nn.Module,
    feeders: Mapping[str, str | None] | None,
    found: dict[int, tuple[nn.Module, list[str], tuple[str, str, int | None, Any]]],
) -> dict[str, str | None]:
    """The declared ``{slot name: feeder name or None}``, checked (every problem at once)."""
    if feeders is None:
        return {}
    if not isinstance(feeders, Mapping):
        raise AutoNormError(
            f"`feeders` must map slot names to layer names, got {type(feeders).__name__}"
        )
    channels = {name: info[2] for _, names, info in found.values() for name in names}
    problems = []
    out: dict[str, str | None] = {}
    for slot, feeder in feeders.items():
        if slot not in channels:
            problems.append(f"{slot!r} is not a norm slot")
            continue
        if feeder is None:
            out[slot] = None
            continue
        try:
            module = model.get_submodule(str(feeder))
        except AttributeError:
            problems.append(f"slot {slot!r}: the model has no module {feeder!r}")
            continue
        if not is_feeder(module):
            problems.append(
                f"slot {slot!r}: {feeder!r} is a {type(module).__name__}; a feeder must be a "
                "Conv1d/2d/3d, Linear or ConvTranspose (groups=1) layer"
            )
        elif output_channels(module) != channels[slot]:
            problems.append(
                f"slot {slot!r}: feeder {feeder!r} has {output_channels(module)} output channels, "
                f"the slot normalizes {channels[slot]}"
            )
        else:
            out[slot] = str(feeder)
    if problems:
        raise AutoNormError(
            f"declared feeders do not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    return out


def _tagged_feeders(feeder_modules: dict[int, tuple[nn.Module, str]]) -> dict[str, str]:
    """``{slot name: feeder name}`` from the weight-side normalizations autonorm applied,
    names moved by the prefix the model gained (wrapped) or lost (unwrapped) since."""
    out = {}
    for module, name in feeder_modules.values():
        tag = tagged_slot(module)
        if tag is None:
            continue
        slot, then = tag
        if name == then:
            out[slot] = name
        elif then and name.endswith("." + then):
            out[name[: -len(then)] + slot] = name
        elif name and then.endswith("." + name):
            lost = then[: -len(name)]
            if slot.startswith(lost):
                out[slot[len(lost) :]] = name
    return out


def _sequential_feeder(model: nn.Module, name: str) -> str | None:
    """The Conv/Linear run right before ``name`` by an ``nn.Sequential`` (its own forward)."""
    if not name:
        return None
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return None
    keys = list(parent._modules)
    index = keys.index(child)
    previous = parent._modules[keys[index - 1]] if index > 0 else None
    if previous is None or not is_feeder(previous):
        return None
    return f"{parent_name}.{keys[index - 1]}" if parent_name else keys[index - 1]


def _feeder_of(
    model: nn.Module,
    names: list[str],
    num_features: int,
    key: int,
    probed: _Probe | None,
    declared: dict[str, str | None],
    tagged: dict[str, str],
) -> str | None:
    """A slot's feeder: declared, else seen by the probe, else recorded by an earlier
    weight-side rewrite, else (no probe) read from an ``nn.Sequential``."""
    for name in names:
        if name in declared:
            return declared[name]
    candidate = None
    sources = probed.sources.get(key) if probed is not None else None
    if sources and len(set(sources)) == 1:  # fed by the same layer at every call
        candidate = sources[0]
    if candidate is None:
        candidate = next((tagged[n] for n in names if n in tagged), None)
    if candidate is None and not sources and len(names) == 1:
        candidate = _sequential_feeder(model, names[0])
    if candidate is None:
        return None
    module = model.get_submodule(candidate)
    return candidate if output_channels(module) == num_features else None


def slot_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Slot name -> module in the slot, without a probe (cheap)."""
    return {s.name: model.get_submodule(s.name) for s in find_slots(model, probe=False)}
