"""Norm classes of other libraries, found by what they compute rather than by name.

Hugging Face's ``LlamaRMSNorm``, ``GemmaRMSNorm`` (``x * (1 + w)``), ``T5LayerNorm`` (RMS without
mean) or torchvision's ``FrozenBatchNorm2d`` are plain ``nn.Module`` subclasses. A module is
*norm-like* when it owns a 1-D ``weight`` (optionally a ``bias`` of the same size) as its only
parameters, or holds ``weight``, ``bias``, ``running_mean`` and ``running_var`` as buffers and no
parameters (a frozen batch norm), has no children, and its class name says ``norm`` or it keeps
an eps (under any attribute name holding ``eps``: ``eps``, ``variance_epsilon``, ``epsilon``).
A norm-like module is a slot when its forward, on random inputs with its weights perturbed,
equals a registry layer of one kind (``rmsnorm``, ``layernorm``; ``frozenbatchnorm`` for the
buffer form) built with one of its eps values, its weights carried over, and possibly an offset
added to its weight (Gemma's ``1 + w``). The rebuilt layer then computes exactly what it did.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from autonorm.config import NormChoice
from autonorm.norms import CHANNELS_FIRST, CHANNELS_LAST
from autonorm.surgery._probe import run_alone, synthetic_inputs
from autonorm.surgery._rebuild import reproduces

#: eps values tried when a module keeps none in an attribute (the usual library defaults).
COMMON_EPS = (1e-5, 1e-6, 1e-8, 1e-12)
#: Offsets added to the weight: none, and Gemma's ``x * (1 + w)``.
WEIGHT_OFFSETS = (0.0, 1.0)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Reading:
    """What a library norm computes, in registry terms.

    Attributes:
        kind: the registry kind that reproduces it.
        layout: the layout under which it does.
        num_features: its channel count (the weight's size).
        eps: the eps it uses.
        eps_attr: the attribute holding that eps (None: a common default it hardcodes).
        weight_offset: added to its weight to get the registry layer's weight.
        ambiguous: it reproduces under the other layout too (on inputs of another rank):
            only a probe can tell which one the model uses.
    """

    kind: str
    layout: str
    num_features: int
    eps: float
    eps_attr: str | None
    weight_offset: float = 0.0
    ambiguous: bool = False


def _foreign(module: nn.Module) -> bool:
    return not type(module).__module__.startswith(("torch.", "autonorm."))


def _form(module: nn.Module) -> str | None:
    """``"affine"`` (a 1-D weight parameter, optional bias), ``"frozen"`` (weight, bias and
    running statistics as buffers) or None: not shaped like a norm."""
    if module._modules or not _foreign(module):
        return None
    params = {k: v for k, v in module._parameters.items() if v is not None}
    weight = params.get("weight")
    if weight is not None and weight.dim() == 1 and set(params) <= {"weight", "bias"}:
        bias = params.get("bias")
        return "affine" if bias is None or bias.shape == weight.shape else None
    buffers = module._buffers
    if not params and all(isinstance(buffers.get(n), torch.Tensor) for n in _FROZEN_BUFFERS):
        shapes = {tuple(buffers[n].shape) for n in _FROZEN_BUFFERS}  # type: ignore[union-attr]
        return "frozen" if len(shapes) == 1 and len(next(iter(shapes))) == 1 else None
    return None


def eps_attributes(module: nn.Module) -> list[tuple[str, float]]:
    """The module's ``(attribute, value)`` pairs that look like an eps: a positive number under
    a name holding ``eps``."""
    return [
        (name, float(value))
        for name, value in vars(module).items()
        if "eps" in name.lower()
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
    ]


def norm_like(module: nn.Module) -> bool:
    """Whether the module is shaped like a norm and says so (name or eps), see the module doc."""
    return _form(module) is not None and (
        "norm" in type(module).__name__.lower() or bool(eps_attributes(module))
    )


def _candidates(form: str) -> list[tuple[str, float]]:
    if form == "frozen":
        return [("frozenbatchnorm", 0.0)]
    return [(kind, offset) for kind in ("rmsnorm", "layernorm") for offset in WEIGHT_OFFSETS]


def _perturbed(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random affine values (and positive variances) in place, so that a forward ignoring or
    offsetting them shows; returns what to restore."""
    generator = torch.Generator().manual_seed(1)
    saved = []
    with torch.no_grad():
        for name in _FROZEN_BUFFERS:
            tensor = getattr(module, name, None)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            saved.append((tensor, tensor.detach().clone()))
            values = torch.randn(tensor.shape, generator=generator)
            if name == "running_var":
                values = values.abs() + 0.5
            tensor.copy_(values.to(tensor.dtype))
    return saved


def _inputs(module: nn.Module, num_features: int, layout: str) -> list[torch.Tensor]:
    """Random inputs of a layout at unit scale and at a scale where eps matters."""
    inputs = synthetic_inputs(module, num_features, layout)
    return [*inputs, *(x * 1e-3 for x in inputs)]


def _matches(
    module: nn.Module, form: str, num_features: int, layout: str
) -> tuple[str, float, str | None, float] | None:
    pairs = [
        (x, y)
        for x in _inputs(module, num_features, layout)
        if (y := run_alone(module, x)) is not None
    ]
    if not pairs:
        return None
    eps_values: list[tuple[str | None, float]] = [*eps_attributes(module)]
    eps_values += [(None, e) for e in COMMON_EPS]
    for (kind, offset), (attr, eps) in itertools.product(_candidates(form), eps_values):
        keep = NormChoice(kind, {"eps": eps})
        if all(
            reproduces(module, num_features, keep, layout, x, y, (), weight_offset=offset)
            for x, y in pairs
        ):
            return kind, eps, attr, offset
    return None


def read_library_norm(module: nn.Module) -> Reading | None:
    """What a norm-like module computes (None: not norm-like, or it reproduces nothing)."""
    form = _form(module)
    if form is None or not norm_like(module):
        return None
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    num_features = int(weight.numel())
    saved = _perturbed(module)
    layouts = (CHANNELS_LAST, CHANNELS_FIRST) if form == "affine" else (CHANNELS_FIRST,)
    try:
        found = [
            (layout, m) for layout in layouts if (m := _matches(module, form, num_features, layout))
        ]
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
    if not found:
        return None
    layout, (kind, eps, attr, offset) = found[0]
    return Reading(kind, layout, num_features, eps, attr, offset, ambiguous=len(found) > 1)


def custom_layouts(
    module: nn.Module,
    keep: NormChoice,
    layouts: list[str],
    num_features: int,
    io: tuple[torch.Tensor, torch.Tensor] | None,
    extra: tuple[str, ...],
    weight_offset: float = 0.0,
) -> list[str]:
    """The ``layouts`` under which the keep choice then ``extra`` reproduces a custom forward:
    on the probe's input when there is one (the first that does), else on synthetic inputs
    (every one that does: a forward that branches on the input's rank may do both)."""
    out = []
    for layout in layouts:
        if io is not None:
            pairs = [io]
        else:
            inputs = synthetic_inputs(module, num_features, layout)
            pairs = [(x, y) for x in inputs if (y := run_alone(module, x)) is not None]
        if any(
            reproduces(module, num_features, keep, layout, x, y, extra, weight_offset)
            for x, y in pairs
        ):
            out.append(layout)
            if io is not None:
                break
    return out


def refusal(module: nn.Module, kind: str, probed: bool) -> str:
    """Why a slot whose forward autonorm cannot reproduce cannot be rewritten."""
    children = [n for n, _ in module.named_children()]
    tried = "the probe's input" if probed else "synthetic inputs"
    return (
        f"its forward ({type(module).__qualname__}) does more than {kind} followed "
        f"by its child modules {children} (checked on {tried}), and autonorm "
        "cannot reproduce it; keep it, or declare what runs after the norm with "
        "autonorm.register_slot_type(..., extra=[...])"
    )
