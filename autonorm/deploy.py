"""Deploy: fold the norms that are affine at inference into the Conv/Linear layer feeding them.

In eval mode a batch norm (``nn.BatchNorm*d``, autonorm's layout variants, ``SyncBatchNorm``)
with running statistics, and a frozen batch norm, compute ``y = x * scale[c] + shift[c]``: a
per-channel affine map that folds into the weight and bias of the layer whose output they
normalize (the slot's *feeder*, :attr:`autonorm.Slot.feeder`), leaving an ``nn.Identity`` in
the slot. Group, instance, layer and RMS norms, DyT and SwitchableNorm depend on the input and
stay. A fold is checked on the example input; one that would change the output (the feeder's
output used elsewhere too) is undone.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> expected = model(x)
    >>> folded = fold_norms(model, x)
    >>> type(folded[1]).__name__, bool(torch.allclose(folded(x), expected, atol=1e-5))
    ('Identity', True)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from autonorm._errors import AutoNormError
from autonorm.norms import FrozenBatchNorm, filter_dim, is_feeder

log = logging.getLogger(__name__)

#: Attribute of a folded model: the :class:`Fold` of each of its slots.
FOLDS_ATTR = "autonorm_folds"
#: Registry kinds that are a per-channel affine map in eval mode.
FOLDABLE_KINDS = ("batchnorm", "syncbatchnorm", "frozenbatchnorm", "batchrenorm")


@dataclass(frozen=True)
class Fold:
    """One slot's fold: ``slot`` into ``feeder``, or why not (``reason``; None: folded)."""

    slot: str
    feeder: str | None
    reason: str | None = None


def inference_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` per channel, in float64, of a norm that computes
    ``x * scale + shift`` in eval mode, or None when its eval output depends on the input.

    Batch norms with running statistics and frozen batch norms (autonorm's, torchvision's
    ``FrozenBatchNorm2d`` and look-alikes with the same buffers and ``eps``) qualify.
    """
    if isinstance(module, _BatchNorm):
        if not module.track_running_stats or module.running_mean is None:
            return None  # eval normalizes with the batch's own statistics
    elif not isinstance(module, FrozenBatchNorm) and not _looks_frozen(module):
        return None
    mean = _float64(module.running_mean)
    var = _float64(module.running_var)
    scale = (var + float(cast(Any, module).eps)).rsqrt()
    weight = getattr(module, "weight", None)
    if weight is not None:
        scale = scale * _float64(weight)
    shift = -mean * scale
    bias = getattr(module, "bias", None)
    if bias is not None:
        shift = shift + _float64(bias)
    return scale, shift


def _float64(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().to(torch.float64)


def _looks_frozen(module: nn.Module) -> bool:
    buffers = dict(module.named_buffers(recurse=False))
    has_stats = {"running_mean", "running_var"} <= buffers.keys()
    return (
        has_stats
        and not list(module.parameters())
        and isinstance(getattr(module, "eps", None), float)
    )


def fold_into(feeder: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of the Conv/Linear ``feeder`` whose output is ``feeder(x) * scale + shift`` per
    output channel; a ws/wn parametrization is baked into the plain weight first."""
    folded = copy.deepcopy(feeder)
    if parametrize.is_parametrized(folded, "weight"):
        parametrize.remove_parametrizations(folded, "weight", leave_parametrized=True)
    weight = cast(torch.Tensor, folded.weight)
    shape = [1] * weight.dim()
    shape[filter_dim(folded)] = -1
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    old_bias = cast(torch.Tensor | None, folded.bias)
    bias = torch.zeros_like(scale) if old_bias is None else _float64(old_bias)
    with torch.no_grad():
        new_weight = _float64(weight) * scale.view(shape)
        folded.weight = nn.Parameter(new_weight.to(weight.dtype), weight.requires_grad)
        folded.bias = nn.Parameter((bias * scale + shift).to(weight.dtype), weight.requires_grad)
    return folded


def plan_folds(model: nn.Module, example_input: Any = None) -> list[Fold]:
    """What :func:`fold_norms` would do with each slot of ``model`` (found with
    :func:`autonorm.find_slots`, which probes ``example_input`` for the feeders)."""
    from autonorm.surgery import find_slots

    modules = dict(model.named_modules())
    plan = []
    for slot in find_slots(model, example_input):
        module = modules[slot.name]
        reason = None
        if slot.kind not in FOLDABLE_KINDS or inference_affine(module) is None:
            reason = f"{slot.kind} depends on the input at inference"
        elif slot.extra != ():
            reason = "its layer does more than normalize (a fused subclass)"
        elif slot.aliases:
            reason = f"the layer is shared with {list(slot.aliases)}"
        elif slot.feeder is None or not is_feeder(modules[slot.feeder]):
            reason = "no Conv/Linear layer feeds it alone"
        else:
            reason = _axis_mismatch(slot, modules[slot.feeder])
        plan.append(Fold(slot.name, slot.feeder, reason))
    return plan


def _axis_mismatch(slot: Any, feeder: nn.Module) -> str | None:
    """Why a Linear's output features may not be the channels a channels-first norm scales
    (a Linear acts on the last dimension, a BatchNorm1d on the second: the same only for a
    2-D ``(N, C)`` input), or None."""
    if not isinstance(feeder, nn.Linear) or slot.layout != "channels_first":
        return None
    if slot.input_shape is None:
        return (
            "a Linear feeds a channels-first batch norm: the same channels only on a 2-D "
            "input, which no probe saw (give example_input)"
        )
    if len(slot.input_shape) != 2:
        return (
            f"a Linear's features are the last dimension of its {len(slot.input_shape)}-D "
            "output, the batch norm's channels its second"
        )
    return None


def _apply(model: nn.Module, fold: Fold) -> Callable[[], None]:
    """Fold one slot; returns what undoes it."""
    assert fold.feeder is not None
    feeder, norm = model.get_submodule(fold.feeder), model.get_submodule(fold.slot)
    affine = inference_affine(norm)
    assert affine is not None
    model.set_submodule(fold.feeder, fold_into(feeder, *affine))
    model.set_submodule(fold.slot, nn.Identity())

    def undo() -> None:
        model.set_submodule(fold.feeder, feeder)  # type: ignore[arg-type]
        model.set_submodule(fold.slot, norm)

    return undo


def _run(model: nn.Module, example_input: Any) -> Any:
    with torch.no_grad():
        if isinstance(example_input, dict):
            return model(**example_input)
        if isinstance(example_input, tuple):
            return model(*example_input)
        return model(example_input)


def _same(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return all(_same(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return all(_same(a[k], b[k], rtol, atol) for k in a)
    return bool(a == b)


def fold_norms(
    model: nn.Module,
    example_input: Any = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    plan: Sequence[Fold] | None = None,
) -> nn.Module:
    """Fold every norm that is affine at inference into the Conv/Linear layer feeding it.

    The model is put in eval mode and changed in place: each folded slot becomes an
    ``nn.Identity`` and its feeder's weight and bias absorb the norm (a ws/wn
    parametrization on the feeder is baked into its weight). With an example input the
    folded model's output is checked against the unfolded one; folds that change it (the
    feeder's output read elsewhere too) are undone one by one.

    Args:
        model: the model (an exported one: :func:`autonorm.apply_config` and trained weights).
        example_input: input for the probe that finds the feeders and for the check (a
            tensor, a tuple of positional arguments or a dict of keyword arguments). Default:
            the model's ``example_input_array``; without one, only feeders an
            ``nn.Sequential`` shows are found and nothing is checked.
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.
        plan: the folds to make (:func:`plan_folds`), when already planned.

    Returns:
        The model; its ``autonorm_folds`` attribute (:data:`FOLDS_ATTR`) lists the
        :class:`Fold` of every slot.
    """
    training = model.training
    model.eval()
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    plan = list(plan_folds(model, example_input) if plan is None else plan)
    todo = [fold for fold in plan if fold.reason is None]
    undos: list[Callable[[], None]] = []
    try:  # all or nothing: on any error the model is as it was
        done = _fold_checked(model, todo, example_input, undos, (rtol, atol))
    except BaseException as err:
        for undo in reversed(undos):
            undo()
        model.train(training)
        if isinstance(err, Exception) and not isinstance(err, AutoNormError):
            raise AutoNormError(f"fold_norms failed, the model is unchanged: {err}") from err
        raise
    result = [
        fold
        if fold.reason is not None or fold.slot in done
        else Fold(
            fold.slot,
            fold.feeder,
            "folding changes the output: the feeder's output is read elsewhere too",
        )
        for fold in plan
    ]
    setattr(model, FOLDS_ATTR, result)  # noqa: B010 (nn.Module's setattr is typed for tensors)
    log.info("folded %d of %d norm slots", len(done), len(plan))
    return model


def _fold_checked(
    model: nn.Module,
    todo: list[Fold],
    example_input: Any,
    undos: list[Callable[[], None]],
    tolerance: tuple[float, float],
) -> dict[str, None]:
    """Make the folds of ``todo`` (their undos appended to ``undos``, in order); with an
    example input, keep only those that leave the output as it was. Returns the folded slots."""
    expected = None if example_input is None else _run(model, example_input)
    for fold in todo:
        try:
            undos.append(_apply(model, fold))
        except Exception as err:
            raise AutoNormError(f"cannot fold {fold.slot} into {fold.feeder}: {err}") from err
    done = dict.fromkeys(fold.slot for fold in todo)
    if expected is None or _same(_run(model, example_input), expected, *tolerance):
        return done
    while undos:
        undos.pop()()
    for fold in todo:  # one at a time, keeping the folds that leave the output as it was
        undo = _apply(model, fold)
        if _same(_run(model, example_input), expected, *tolerance):
            undos.append(undo)
        else:
            undo()
            del done[fold.slot]
    return done


def _as_args(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_input, dict):
        return (), example_input
    if isinstance(example_input, tuple):
        return example_input, {}
    return (example_input,), {}


def _batch_dynamic(example_input: Any) -> Any:
    """``dynamic_shapes`` for ``torch.export``: every tensor input's first dimension (the
    batch) left to the exporter (``Dim.AUTO``: dynamic unless the model fixes it)."""

    def spec(value: Any) -> Any:
        return (
            {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() else None
        )

    args, kwargs = _as_args(example_input)
    if kwargs:
        return {name: spec(value) for name, value in kwargs.items()}
    return tuple(spec(value) for value in args)


def export_program(model: nn.Module, example_input: Any, path: str | Path) -> Path:
    """Write ``model`` (in eval mode) as a ``torch.export`` program (``.pt2``), loadable with
    ``torch.export.load(path).module()`` without the model's code; the batch dimension is
    dynamic where the model allows."""
    args, kwargs = _as_args(example_input)
    dynamic = _batch_dynamic(example_input)
    program = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dynamic)
    torch.export.save(program, path)
    return Path(path)


#: The ONNX packages (``pip install 'autonorm[deploy]'``).
ONNX_PACKAGES = "onnx onnxscript onnxruntime"


def export_onnx(model: nn.Module, example_input: Any, path: str | Path) -> Path:
    """Write ``model`` (in eval mode) as one ONNX file with ``torch.onnx.export(dynamo=True)``
    (weights inside, no ``.onnx.data`` side file); the batch dimension is dynamic where the
    model allows.

    Raises:
        ImportError: onnx or onnxscript is not installed.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript: pip install {ONNX_PACKAGES} ({err})"
        ) from None
    args, kwargs = _as_args(example_input)
    torch.onnx.export(
        model.eval(),
        args,
        str(path),
        kwargs=kwargs,
        dynamic_shapes=_batch_dynamic(example_input),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return Path(path)


def onnx_difference(path: str | Path, model: nn.Module, example_input: Any) -> float:
    """The largest difference between the ONNX file run by onnxruntime and ``model`` on
    ``example_input`` (a tensor or a tuple of tensors).

    Raises:
        ImportError: onnxruntime is not installed.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args, kwargs = _as_args(example_input)
    values = [*args, *kwargs.values()]
    feed = {
        i.name: v.detach().cpu().numpy() for i, v in zip(session.get_inputs(), values, strict=True)
    }
    got = session.run(None, feed)
    with torch.no_grad():
        expected = _run(model.eval(), example_input)
    flat = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    return max(
        float((torch.as_tensor(g) - e.detach().cpu()).abs().max())
        for g, e in zip(got, flat, strict=True)
    )
