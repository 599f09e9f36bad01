"""Property tests (hypothesis) of every registry layer against its formula, written out here in
plain torch ops: random shapes ((N, C) to three position dims), both layouts, channel counts,
group counts that divide them, eps, affine on and off, momentum and tracking, train and eval
mode, float32 and float64, contiguous or strided inputs, means up to 1e3. The forward, the input
gradient and every parameter's gradient (with a random upstream gradient) must equal autograd of
the formula in float64; a fresh layer must have the parameters and initial values its choice
implies; batch-dependent layers must update their running statistics as BatchNorm does. Under
CPU autocast the layers with fused paths must stay close to the formula. The examples are
derandomized: CI runs the same ones each time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autonorm.norms import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    NORM_NAMES,
    SWITCHABLE_CANDIDATES,
    create_norm,
    default_groups,
    get_spec,
    sparsestmax,
    vertex_radius,
)

CHANNELS = (4, 6, 8, 12)
EPS = (1e-5, 1e-3, 0.1)
#: eps where a choice leaves it out (None: the input dtype's machine epsilon, as nn.RMSNorm).
DEFAULT_EPS: dict[str, float | None] = {
    "batchnorm": 1e-5,
    "syncbatchnorm": 1e-5,
    "frozenbatchnorm": 1e-5,
    "groupnorm": 1e-5,
    "instancenorm": 1e-5,
    "layernorm": 1e-5,
    "rmsnorm": None,
    "switchable": 1e-5,
    "dyt": None,
    "identity": None,
    "batchrenorm": 1e-5,
    "frn": 1e-6,
    "evonorm_s0": 1e-5,
}
#: Layers with a fused autograd function for float32/float64 (in some layout), and
#: SwitchableNorm, which computes its statistics in float32 under autocast.
FUSED = ("layernorm", "rmsnorm", "dyt", "groupnorm", "switchable")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the examples are tiny, and CI runners have two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One drawn layer and input."""

    name: str
    layout: str
    shape: tuple[int, ...]
    input_ndim: int | None  # given to the registry (None: a rank-agnostic layer)
    kwargs: dict[str, Any]
    dtype: torch.dtype
    training: bool
    seed: int
    radius: float | None = None  # Sparse SN's radius, set on the built layer
    strided: bool = False  # input and upstream gradient in reversed memory order
    offset: float = 0.0  # added to the input: a large mean over a spread of about 1
    constant_channel: bool = False  # channel 0 one value over the batch and positions

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == CHANNELS_FIRST else self.shape[-1]


def _own_float32_path(name: str, layout: str, ndim: int) -> bool:
    """Whether autonorm computes the float32 layer itself, in two passes or centered: the fused
    functions (over C at each position; channels-last group norm with positions), SwitchableNorm
    on tokens and FrozenBatchNorm. Elsewhere torch's kernels compute it, whose float32 precision
    on a large mean is torch's (one-pass variances: F.group_norm on (N, C, 1, 1) at a mean of
    1e3 returns garbage)."""
    if layout == CHANNELS_FIRST:
        return name in ("layernorm", "rmsnorm", "frozenbatchnorm", "switchable")
    return name in ("switchable", "frozenbatchnorm") or (name == "groupnorm" and ndim > 2)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def cases(
    draw: st.DrawFn,
    name: str,
    *,
    layouts: tuple[str, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    large_means: bool = True,
) -> Case:
    """A case of the registry choice ``name``; ``large_means``: inputs may have a mean of 1e2
    or 1e3 over a spread of about 1 (float32: where autonorm computes the layer itself)."""
    spec = get_spec(name)
    layout = draw(st.sampled_from(layouts or spec.layouts))
    channels = draw(st.sampled_from(CHANNELS))
    batch = draw(st.integers(2, 4))  # batch statistics need more than one value per channel
    max_rank = 3 if layout == CHANNELS_FIRST else 2
    min_rank = 1 if spec.needs_positions else 0
    positions = draw(st.lists(st.integers(1, 4), min_size=min_rank, max_size=max_rank))
    if spec.needs_positions and math.prod(positions) < 2:
        positions[0] = draw(st.integers(2, 4))
    if layout == CHANNELS_FIRST:
        shape = (batch, channels, *positions)
    else:
        shape = (batch, *positions, channels)
    input_ndim = draw(st.sampled_from([len(shape), None]))
    kwargs: dict[str, Any] = {}
    eps = draw(st.sampled_from([None, *EPS]))
    if eps is not None:
        kwargs["eps"] = eps
    affine = draw(st.sampled_from([None, True, False]))
    if affine is not None:
        kwargs["affine"] = affine
    if "momentum" in spec.params:
        momentum = draw(st.sampled_from(["default", 0.1, 0.5, None]))
        if momentum != "default":
            kwargs["momentum"] = momentum
    if "track_running_stats" in spec.params:
        track = draw(st.sampled_from([None, True, False]))
        if track is not None:
            kwargs["track_running_stats"] = track
        if name == "instancenorm" and track and kwargs.get("momentum", 0.1) is None:
            del kwargs["momentum"]  # refused (it would never update the statistics)
    if name in ("groupnorm", "evonorm_s0"):
        groups = draw(st.sampled_from([None, *_divisors(channels)]))
        if groups is not None:
            kwargs["groups"] = groups
    radius = None
    if name == "switchable":
        allowed = SWITCHABLE_CANDIDATES[layout]
        if draw(st.booleans()):
            kwargs["candidates"] = tuple(
                draw(st.permutations(allowed))[: draw(st.integers(1, len(allowed)))]
            )
        if draw(st.booleans()):
            kwargs["mixing"] = "sparsestmax"
            k = len(kwargs.get("candidates", allowed))
            radius = draw(st.floats(0.0, 1.2 * vertex_radius(k)))
    if name == "batchrenorm":  # every phase: warm-up, ramp, at the limits (the step is drawn)
        kwargs["r_max"] = draw(st.sampled_from([1.0, 1.2, 3.0]))
        kwargs["d_max"] = draw(st.sampled_from([0.0, 0.3, 5.0]))
        kwargs["warmup_steps"] = draw(st.integers(0, 2))
        kwargs["ramp_steps"] = draw(st.integers(1, 3))
    if name == "dyt" and draw(st.booleans()):
        kwargs["alpha_init"] = draw(st.floats(-2.0, 2.0, allow_nan=False))
    dtype = draw(st.sampled_from(dtypes))
    offsets = (0.0,)
    own = dtype == torch.float64 or _own_float32_path(name, layout, len(shape))
    if large_means and own and name not in ("dyt", "identity"):  # (DyT saturates)
        offsets = (0.0, 0.0, 1e2, 1e3)
    return Case(
        name=name,
        layout=layout,
        shape=shape,
        input_ndim=input_ndim,
        kwargs=kwargs,
        dtype=dtype,
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        radius=radius,
        strided=draw(st.booleans()),
        offset=draw(st.sampled_from(offsets)),
    )


# -- building, inputs --------------------------------------------------------------------------


def _tracks(case: Case) -> bool:
    """Whether the layer keeps running statistics."""
    if case.name == "switchable" and "batch" not in case.kwargs.get("candidates", ("batch",)):
        return False  # no batch branch
    if case.name not in ("batchnorm", "syncbatchnorm", "instancenorm", "switchable"):
        return case.name in ("frozenbatchnorm", "batchrenorm")
    return case.kwargs.get("track_running_stats", case.name != "instancenorm")


def check_initial_state(case: Case, layer: nn.Module) -> None:
    """A fresh layer has the parameters its choice implies, at their initial values: affine
    ``weight`` 1 and ``bias`` 0 (nn.RMSNorm: no bias), DyT's ``alpha`` at ``alpha_init``,
    SwitchableNorm's equal logits, running mean 0 and variance 1 where statistics are kept."""
    affine = case.kwargs.get("affine", True) and case.name != "identity"
    own = {
        "dyt": {"alpha"},
        "switchable": {"mean_weight", "var_weight"},
        "frn": {"tau"},
        "evonorm_s0": {"v"},
    }.get(case.name, set())
    if affine:
        own |= {"weight"} if case.name == "rmsnorm" else {"weight", "bias"}
    if case.name == "frozenbatchnorm":  # frozen: its affine and statistics are buffers
        own = set()
    params = dict(layer.named_parameters())
    assert set(params) == own
    state = {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    assert ("running_mean" in state) == ("running_var" in state) == _tracks(case)
    initial = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    initial.update(mean_weight=1.0, var_weight=1.0, alpha=case.kwargs.get("alpha_init", 0.5))
    initial.update(tau=0.0, v=1.0)
    for key, value in state.items():
        if key in initial:
            expected = torch.full_like(value, initial[key])
            assert torch.equal(value, expected), f"initial {key}: {value}"
        assert value.dtype == case.dtype, key


def _build(case: Case) -> nn.Module:
    """The registry's layer for ``case`` (its initial state checked), its parameters and
    buffers randomized."""
    layer = create_norm(
        case.name,
        case.channels,
        layout=case.layout,
        input_ndim=case.input_ndim,
        dtype=case.dtype,
        **case.kwargs,
    )
    check_initial_state(case, layer)
    gen = torch.Generator().manual_seed(case.seed + 1)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)

    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(randn(p) * 0.5 + (1.0 if name in ("weight", "alpha") else 0.0))
        for name, b in layer.named_buffers():
            if name in ("running_mean", "bias"):
                b.copy_(randn(b))
            elif name == "weight":  # FrozenBatchNorm's frozen affine
                b.copy_(randn(b) * 0.5 + 1.0)
            elif name == "running_var":
                b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif name == "radius" and case.radius is not None:
                b.fill_(case.radius)
            elif name == "num_batches_tracked" and case.name == "batchrenorm":
                b.fill_(case.seed % 5)  # the step sets Batch Renormalization's limits
    return layer.train(case.training)


def _input(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """An input whose per-sample, per-channel and per-position statistics differ (so that each
    choice of statistics matters) and an upstream gradient, both in the case's dtype (strided:
    not contiguous)."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = case.shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5 + case.offset
    channel_dim = 1 if case.layout == CHANNELS_FIRST else len(shape) - 1
    for dim in sorted({0, channel_dim, len(shape) - 1}):
        offset_shape = [1] * len(shape)
        offset_shape[dim] = shape[dim]
        x = x + torch.randn(offset_shape, generator=gen, dtype=torch.float64)
    if case.constant_channel:  # no variance over the batch or positions (nor per sample)
        x.select(channel_dim, 0).fill_(0.5 + case.offset)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    x, grad = x.to(case.dtype), grad.to(case.dtype)
    if case.strided:  # the same values, the dims laid out in reverse order in memory
        reverse = tuple(reversed(range(len(shape))))
        x, grad = (t.permute(reverse).contiguous().permute(reverse) for t in (x, grad))
    return x, grad


# -- the formulas --------------------------------------------------------------------------------


def _moments(h: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims``, kept."""
    mean = h.mean(dims, keepdim=True)
    return mean, (h - mean).square().mean(dims, keepdim=True)


def _switchable_weights(case: Case, params: dict[str, torch.Tensor], radius: float | None):
    """The mixing weights of the mean and of the variance: the softmax of each logit vector
    (Luo et al. eq. 4); Sparse SN: one set, the sparsestmax of their average."""
    mean_logits, var_logits = params["mean_weight"], params["var_weight"]
    if case.kwargs.get("mixing") == "sparsestmax":
        weights = sparsestmax((mean_logits + var_logits) / 2, radius or 0.0)
        return weights, weights
    return torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0)


def reference(
    case: Case,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    *,
    info: dict[str, float] | None = None,
) -> torch.Tensor:
    """The layer of ``case`` written from its formula, in ``x``'s dtype.

    Works on ``h`` ``(N, S, C)``: the channels last, the positions flattened (S = 1 for an
    ``(N, C)`` input). ``params`` and ``buffers`` are the layer's, by name. ``info`` gets
    ``"rstd"``: the largest ``1 / sqrt(var + eps)`` the formula divides by (1 if none).
    """
    name, kw, training = case.name, case.kwargs, case.training
    h = x.movedim(1, -1) if case.layout == CHANNELS_FIRST else x
    moved_shape = h.shape
    n, c = h.shape[0], h.shape[-1]
    h = h.reshape(n, -1, c)
    eps = kw.get("eps", DEFAULT_EPS[name])
    if eps is None:  # the dtype of the layer's input, not of the formula's
        eps = torch.finfo(case.dtype).eps
    weight, bias = params.get("weight"), params.get("bias")
    track = kw.get("track_running_stats", name != "instancenorm")

    def running() -> tuple[torch.Tensor, torch.Tensor]:
        return buffers["running_mean"].view(1, 1, c), buffers["running_var"].view(1, 1, c)

    def normalize(centered: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        if info is not None:
            info["rstd"] = max(info.get("rstd", 1.0), (var + eps).rsqrt().max().item())
        return centered / torch.sqrt(var + eps)

    if name in ("batchnorm", "syncbatchnorm", "instancenorm"):
        dims = (1,) if name == "instancenorm" else (0, 1)  # per (n, c) / per c
        mean, var = _moments(h, dims) if training or not track else running()
        out = normalize(h - mean, var)
    elif name == "frozenbatchnorm":
        mean, var = running()
        out = normalize(h - mean, var)
        weight, bias = buffers.get("weight"), buffers.get("bias")
    elif name == "groupnorm":
        groups = kw.get("groups") or default_groups(c, input_ndim=case.input_ndim)
        grouped = h.reshape(n, -1, groups, c // groups)
        mean, var = _moments(grouped, (1, 3))  # per sample and group: its channels, positions
        out = normalize(grouped - mean, var).reshape(h.shape)
    elif name == "layernorm":  # over C at each position, in either layout
        mean, var = _moments(h, (2,))
        out = normalize(h - mean, var)
    elif name == "rmsnorm":
        out = normalize(h, h.square().mean(2, keepdim=True))
    elif name == "dyt":
        out = torch.tanh(params["alpha"] * h)
    elif name == "identity":
        out = h
    elif name == "batchrenorm":
        out = _renorm_reference(case, h, buffers, running(), normalize)
    elif name == "frn":  # per sample and channel over the positions; its TLU comes below
        out = normalize(h, h.square().mean(1, keepdim=True))
    elif name == "evonorm_s0":  # x * sigmoid(v x) / std over each group's channels, positions
        groups = kw.get("groups") or default_groups(c, input_ndim=case.input_ndim)
        grouped = h.reshape(n, -1, groups, c // groups)
        _, var = _moments(grouped, (1, 3))
        std = normalize(torch.ones_like(grouped), var).reciprocal().reshape(h.shape)
        out = h * torch.sigmoid(params["v"].view(1, 1, c) * h) / std
    elif name == "switchable":
        candidates = kw.get("candidates", SWITCHABLE_CANDIDATES[case.layout])
        if case.layout == CHANNELS_FIRST:
            dims = {"instance": (1,), "layer": (1, 2), "batch": (0, 1)}
        else:  # tokens: per token over C, per channel over every token
            dims = {"layer": (2,), "batch": (0, 1)}
        stats = {}
        for cand in candidates:
            if cand == "rms":  # zero mean, the mean of squares
                stats[cand] = (torch.zeros(()), h.square().mean(2, keepdim=True))
            elif cand == "batch" and not training and track:
                stats[cand] = running()
            else:
                stats[cand] = _moments(h, dims[cand])
        mean_w, var_w = _switchable_weights(case, params, case.radius)
        mean = sum(mean_w[k] * stats[cand][0] for k, cand in enumerate(candidates))
        var = sum(var_w[k] * stats[cand][1] for k, cand in enumerate(candidates))
        out = normalize(h - mean, var)
    else:  # a registry name without a formula here: test_every_registry_name_has_a_formula
        raise AssertionError(f"no reference formula for {name!r}")
    if weight is not None:
        out = out * weight.view(1, 1, c)
    if bias is not None:
        out = out + bias.view(1, 1, c)
    if name == "frn":  # the Thresholded Linear Unit
        out = torch.maximum(out, params["tau"].view(1, 1, c))
    out = out.reshape(moved_shape)
    return out.movedim(-1, 1) if case.layout == CHANNELS_FIRST else out


def _renorm_reference(case, h, buffers, running, normalize):
    """Batch Renormalization (Ioffe 2017): in training the batch-normalized value times ``r``
    plus ``d``, both clipped and constants for the gradient, with limits grown linearly from
    (1, 0) after the warm-up; in eval mode BatchNorm's inference."""
    eps = case.kwargs.get("eps", 1e-5)
    running_mean, running_var = running
    if not case.training:
        return normalize(h - running_mean, running_var)
    kw = {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 5000, "ramp_steps": 20000, **case.kwargs}
    step = int(buffers["num_batches_tracked"])
    progress = min(max((step - kw["warmup_steps"]) / kw["ramp_steps"], 0.0), 1.0)
    r_max, d_max = 1 + (kw["r_max"] - 1) * progress, kw["d_max"] * progress
    mean, var = _moments(h, (0, 1))
    sigma = torch.sqrt(running_var + eps)
    r = (torch.sqrt(var + eps) / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean) / sigma).clamp(-d_max, d_max).detach()
    return normalize(h - mean, var) * r + d


def expected_running_stats(
    case: Case, x: torch.Tensor, before: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The running statistics after one training step on ``x``: BatchNorm's update with the
    unbiased variance (momentum None: the cumulative average); instance norm averages the
    per-instance statistics over the batch."""
    h = x.movedim(1, -1) if case.layout == CHANNELS_FIRST else x
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    if case.name == "instancenorm":
        count = h.shape[1]
        mean, var = _moments(h, (1,))
        mean, var = mean.mean((0, 1)), var.mean((0, 1)) * count / (count - 1)
    else:
        count = h.shape[0] * h.shape[1]
        mean, var = _moments(h, (0, 1))
        mean, var = mean.flatten(), var.flatten() * count / (count - 1)
    # torch's instance norm keeps num_batches_tracked at 0 (and reads momentum=None as 0)
    tracked = before["num_batches_tracked"] + (case.name != "instancenorm")
    momentum = case.kwargs.get("momentum", 0.1)
    factor = 1.0 / float(tracked) if momentum is None else momentum
    return {
        "running_mean": before["running_mean"] * (1 - factor) + mean * factor,
        "running_var": before["running_var"] * (1 - factor) + var * factor,
        "num_batches_tracked": tracked,
    }


# -- comparisons ---------------------------------------------------------------------------------


def tolerance(dtype: torch.dtype, x: torch.Tensor, rstd: float) -> float:
    """The error allowed relative to the result's scale: 1e-10 in float64 and 1e-5 in float32,
    or a multiple of the dtype's rounding of the statistics amplified by the normalization,
    where that is larger: a group of one or two values, or a near-constant one, with a small
    eps (``rstd``: the formula's largest ``1 / sqrt(var + eps)``) takes torch's float32 kernels
    (one-pass variances) far from the float64 formula, and autonorm's too."""
    floor = 1e-10 if dtype == torch.float64 else 1e-5
    roundoff = torch.finfo(dtype).eps / 2
    return max(floor, 32 * roundoff * x.abs().max().item() * rstd * rstd)


def assert_close(got: torch.Tensor | None, expected: torch.Tensor, rel: float, what: str) -> None:
    """``got`` (None: a zero gradient) within ``rel`` times the largest magnitude of
    ``expected`` (at least 1) of it."""
    got = torch.zeros_like(expected) if got is None else got.detach().double()
    expected = expected.detach().double()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}"
    if not expected.numel():
        return
    scale = max(1.0, expected.abs().max().item())
    error = (got - expected).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:.3g} * {scale:.3g}"


def _as_leaves(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().requires_grad_() for k, v in tensors.items()}


def check_against_reference(case: Case) -> nn.Module:
    """Forward, input gradient and parameter gradients of ``case``'s layer equal autograd of
    :func:`reference` in float64, on the same (rounded) input, parameters, buffers and upstream
    gradient (within :func:`tolerance`). Returns the layer after the step."""
    layer = _build(case)
    x, grad = _input(case)
    buffers = {k: v.detach().double().clone() for k, v in layer.named_buffers() if v is not None}
    x = x.requires_grad_()
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.backward(grad)

    x_ref = x.detach().double().requires_grad_()
    params = _as_leaves(dict(layer.named_parameters()))
    info: dict[str, float] = {}
    expected = reference(case, x_ref, params, buffers, info=info)
    expected.backward(grad.double())
    rel = tolerance(case.dtype, x, info.get("rstd", 1.0))
    assert_close(out, expected, rel, "output")
    assert_close(x.grad, x_ref.grad, rel, "input gradient")
    for name, p in layer.named_parameters():
        assert_close(p.grad, params[name].grad, rel, f"gradient of {name}")
    return layer


# -- properties ------------------------------------------------------------------------------------


def test_every_registry_name_has_a_formula():
    """A new registry name fails here until this file knows its formula and default eps."""
    assert set(DEFAULT_EPS) == set(NORM_NAMES)
    for name in NORM_NAMES:
        case = Case(name, CHANNELS_FIRST, (2, 4, 3), 3, {}, torch.float64, True, 0)
        x = torch.zeros(case.shape, dtype=torch.float64)
        layer = _build(case)
        buffers = {k: v.double() for k, v in layer.named_buffers() if v is not None}
        params = {k: v.detach().double() for k, v in layer.named_parameters()}
        assert reference(case, x, params, buffers).shape == x.shape


@pytest.mark.parametrize("name", NORM_NAMES)
@settings(max_examples=150)
@given(data=st.data())
def test_forward_and_gradients_equal_the_formula(name, data):
    """Every registry layer, both layouts, (N, C) to 3-D positions, contiguous or not: output,
    input gradient and parameter gradients are those of the formula."""
    case = data.draw(cases(name), label="case")
    check_against_reference(case)


@pytest.mark.parametrize("name", NORM_NAMES)
@settings(max_examples=30)
@given(data=st.data())
def test_a_channel_without_variance_equals_the_formula(name, data):
    """A channel with one value over the batch and positions (a dead feature, padding): zero
    batch and instance variances, which the kernels report as an infinite or a zero inverse
    standard deviation; the layers must read both as 0."""
    case = data.draw(cases(name, dtypes=(torch.float64,), large_means=False), label="case")
    case.constant_channel = True
    check_against_reference(case)


@pytest.mark.parametrize(
    "name", ["batchnorm", "syncbatchnorm", "instancenorm", "switchable", "batchrenorm"]
)
@settings(max_examples=40)
@given(data=st.data())
def test_training_updates_running_statistics_as_batchnorm(name, data):
    """One training step folds the batch statistics (unbiased variance) into the running ones
    with the momentum, or the cumulative average; an eval step leaves them alone."""
    case = data.draw(cases(name, dtypes=(torch.float64,)), label="case")
    if name == "instancenorm" and case.kwargs.get("momentum", 0.1) is None:
        return  # torch's instance norm reads momentum=None as 0: no update to compare
    track = _tracks(case)
    layer = _build(case)
    before = {k: v.detach().clone() for k, v in layer.named_buffers() if v is not None}
    x, _ = _input(case)
    with torch.no_grad():
        layer(x)
    after = {k: v for k, v in layer.named_buffers() if v is not None}
    if not (track and case.training):
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), key
        return
    expected = expected_running_stats(case, x, before)
    for key, value in expected.items():
        assert_close(after[key], value, 1e-12, key)


@pytest.mark.parametrize("layout", [CHANNELS_LAST, CHANNELS_FIRST])
@settings(max_examples=80)
@given(data=st.data())
def test_groupnorm_with_groups_strictly_between_one_and_channels(layout, data):
    """Channels-last GroupNorm's fused backward (GroupNormTokens) with 1 < groups < C, on
    tokens with one or two position dims, and torch's own channels-first layer alike."""
    case = data.draw(cases("groupnorm", layouts=(layout,)), label="case")
    channels = case.channels
    groups = data.draw(st.sampled_from(_divisors(channels)[1:-1]), label="groups")
    positions = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="positions")
    batch = case.shape[0]
    if layout == CHANNELS_LAST:
        shape = (batch, *positions, channels)
    else:
        shape = (batch, channels, *positions)
    case.shape, case.input_ndim = shape, len(shape)
    case.kwargs["groups"] = groups
    if case.dtype == torch.float64 or layout == CHANNELS_LAST:  # see _own_float32_path
        case.offset = data.draw(st.sampled_from([0.0, 1e2, 1e3]), label="offset")
    layer = check_against_reference(case)
    assert layer.num_groups == groups


def _autocast_cases(name: str) -> st.SearchStrategy[Case]:
    # the layouts with a fused path: channels-first layer/rms norms, channels-last group norm
    layouts = {"layernorm": (CHANNELS_FIRST,), "rmsnorm": (CHANNELS_FIRST,)}
    layouts["groupnorm"] = (CHANNELS_LAST,)
    # the fallbacks are torch's layers: their precision on a large mean is torch's
    return cases(name, layouts=layouts.get(name), dtypes=(torch.float32,), large_means=False)


@pytest.mark.parametrize("name", FUSED)
@settings(max_examples=30)
@given(data=st.data())
def test_under_autocast_the_fused_layers_stay_close_to_the_float32_formula(name, data):
    """Under CPU autocast (bfloat16) the fused functions step aside for torch's layers, which
    compute the statistics in float32 (SwitchableNorm computes its own in float32): output and
    gradients of a float32 input stay within bfloat16's reach (2e-2) of the formula."""
    case = data.draw(_autocast_cases(name), label="case")
    layer = _build(case)
    x, grad = _input(case)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.shape == x.shape and out.dtype in (torch.float32, torch.bfloat16)
    grad = grad.to(out.dtype)
    out.backward(grad)
    assert x.grad.dtype == x.dtype
    buffers = {k: v.detach().double().clone() for k, v in layer.named_buffers() if v is not None}
    x_ref = x.detach().double().requires_grad_()
    params = _as_leaves(dict(layer.named_parameters()))
    info: dict[str, float] = {}
    expected = reference(case, x_ref, params, buffers, info=info)
    expected.backward(grad.double())
    # torch's float32 GroupNorm backward on a permuted (channels-last) input is some 30 times
    # less accurate on a near-degenerate group than on a contiguous one
    rel = max(2e-2, 8 * tolerance(torch.float32, x, info.get("rstd", 1.0)))
    assert_close(out, expected, rel, "output")
    assert_close(x.grad, x_ref.grad, rel, "input gradient")
    for pname, p in layer.named_parameters():
        assert p.grad is None or p.grad.dtype == p.dtype
        assert_close(p.grad, params[pname].grad, rel, f"gradient of {pname}")


# -- regressions --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4), (3, 6, 1, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_switchable_input_gradient_on_a_large_mean_input_with_one_position(shape, seed):
    """Found by the large-mean inputs of the formula test. In eval mode the batch branch reads
    running statistics far from a mean of 1e3, so dL/dvar of the instance branch is large and
    its term 2 (x - mean) dL/dvar / S, zero for S = 1, was computed as the difference of two
    numbers ~1e5: the float32 input gradient was off by 1-20% (the formula in plain float32
    ops: 1e-7). The backward now centres x before scaling."""
    case = Case(
        "switchable",
        CHANNELS_FIRST,
        shape,
        len(shape),
        {"candidates": ("instance", "batch")},
        torch.float32,
        training=False,  # the batch branch reads the running statistics, far from the input
        seed=seed,
    )
    layer = _build(case)
    x, grad = _input(case)
    x = (x.double() + 1e3).float().requires_grad_()
    layer(x).backward(grad)
    x_ref = x.detach().double().requires_grad_()
    params = _as_leaves(dict(layer.named_parameters()))
    buffers = {k: v.detach().double() for k, v in layer.named_buffers() if v is not None}
    reference(case, x_ref, params, buffers).backward(grad.double())
    # the same formula in plain float32 ops is within 1e-7 of the float64 one
    assert_close(x.grad, x_ref.grad, 1e-4, "input gradient")
