"""The fused autograd functions behind LayerNorm/RMSNorm over channels and DyT: the same
numerics as the plain formulas (gradcheck in float64, a large mean with a small spread,
strided inputs and gradients), saving only the input and per-position statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autonorm.norms import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    DyT,
    GroupNormChannelsLast,
    InstanceNormChannelsLast,
    create_norm,
)
from autonorm.norms._layers import InstanceNormNd

C = 5


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula with plain autograd ops, in float64 (``eps=None``: the input
    dtype's epsilon, as ``nn.RMSNorm``)."""
    default_eps = torch.finfo(x.dtype).eps
    x = x.double()
    channel_dim = 1 if getattr(layer, "layout", CHANNELS_LAST) == CHANNELS_FIRST else -1
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    weight = getattr(layer, "weight", None)
    weight = None if weight is None else weight.double().view(shape)
    bias = None if getattr(layer, "bias", None) is None else layer.bias.double().view(shape)
    if isinstance(layer, DyT):
        out = torch.tanh(layer.alpha.double() * x)
    elif isinstance(layer, GroupNormChannelsLast | InstanceNormChannelsLast):
        groups = getattr(layer, "num_groups", C)
        h = x.reshape(x.shape[0], -1, groups, C // groups)
        mean = h.mean((1, 3), keepdim=True)
        var = (h - mean).square().mean((1, 3), keepdim=True)
        out = ((h - mean) / torch.sqrt(var + layer.eps)).reshape(x.shape)
    elif isinstance(layer, nn.LayerNorm):
        mean = x.mean(channel_dim, keepdim=True)
        var = (x - mean).square().mean(channel_dim, keepdim=True)
        out = (x - mean) / torch.sqrt(var + layer.eps)
    else:
        eps = layer.eps if layer.eps is not None else default_eps
        out = x / torch.sqrt(x.square().mean(channel_dim, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _native(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch's own computation of the layer: nn.LayerNorm / nn.RMSNorm over the channels
    moved last, DyT with plain ops."""
    if isinstance(layer, DyT):
        return _reference(layer, x).to(x.dtype)
    if isinstance(layer, GroupNormChannelsLast):
        return nn.GroupNorm.forward(layer, x.movedim(-1, 1)).movedim(1, -1)
    if isinstance(layer, InstanceNormChannelsLast):
        return InstanceNormNd.forward(layer, x.movedim(-1, 1)).movedim(1, -1)
    channel_dim = 1 if layer.layout == CHANNELS_FIRST else -1
    moved = x.movedim(channel_dim, -1)
    base = nn.LayerNorm if isinstance(layer, nn.LayerNorm) else nn.RMSNorm
    out = base.forward(layer, moved)
    return out.movedim(-1, channel_dim)


CASES = [
    pytest.param(
        name, layout, shape, affine, id=f"{name}-{layout}-{'affine' if affine else 'plain'}"
    )
    for name, layout, shape in (
        ("layernorm", CHANNELS_FIRST, (3, C, 4, 2)),
        ("rmsnorm", CHANNELS_FIRST, (3, C, 4, 2)),
        ("dyt", CHANNELS_FIRST, (3, C, 4, 2)),
        ("dyt", CHANNELS_LAST, (3, 4, C)),
        ("groupnorm", CHANNELS_LAST, (3, 4, 2, C)),
        ("instancenorm", CHANNELS_LAST, (3, 4, C)),
    )
    for affine in (True, False)
]


def _layer(name, layout, affine, dtype=torch.float64):
    kwargs = {"groups": 1} if name == "groupnorm" else {}  # C = 5 channels: one group
    layer = create_norm(name, C, layout=layout, affine=affine, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.5)
    return layer


@pytest.mark.parametrize(("name", "layout", "shape", "affine"), CASES)
def test_gradcheck(name, layout, shape, affine):
    layer = _layer(name, layout, affine)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    inputs = (x.requires_grad_(), *[p.detach().requires_grad_() for p in params])
    # the kernels' vectorized sums may round differently from one call to the next
    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=1e-12)


@pytest.mark.parametrize(("name", "layout", "shape", "affine"), CASES)
def test_matches_the_formula_on_a_large_mean_and_small_spread(name, layout, shape, affine):
    layer = _layer(name, layout, affine, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    scale = 1.0 if name == "dyt" else 1e-3  # dyt saturates: its input stays O(1)
    base = 0.3 if name == "dyt" else 1e3
    x64 = base + scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x64.float().requires_grad_()
    layer(x).backward(grad.float())
    x_ref = x.detach().double().requires_grad_()  # the same (float32-rounded) input
    expected = _reference(layer, x_ref)
    expected.backward(grad)
    # float32 rounds a mean of 1e3 to 6e-5, a few % of the spread: no float32 layer does
    # better than torch's own (the layer's native path, over permuted dims), nor may this one
    x_native = x.detach().clone().requires_grad_()
    native = _native(layer, x_native)
    native.backward(grad.float())
    out_error = (layer(x).double() - expected).abs().max()
    native_error = (native.double() - expected).abs().max()
    assert out_error <= 2 * native_error + 1e-5
    grad_error = (x.grad.double() - x_ref.grad).abs().max()
    native_grad_error = (x_native.grad.double() - x_ref.grad).abs().max()
    assert grad_error <= 2 * native_grad_error + 1e-5 * x_ref.grad.abs().max()


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "dyt"])
def test_strided_input_and_expanded_gradient(name):
    layer = _layer(name, CHANNELS_FIRST, True, dtype=torch.float64)
    x = torch.randn(2, C, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()  # an expanded (stride 0) gradient
    x_ref = x.detach().contiguous().requires_grad_()
    expected = _reference(layer, x_ref)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    own = {t.untyped_storage().data_ptr() for t in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in own:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("name", "layout", "shape"),
    [
        ("layernorm", CHANNELS_FIRST, (4, 16, 8, 8)),
        ("rmsnorm", CHANNELS_FIRST, (4, 16, 8, 8)),
        ("dyt", CHANNELS_FIRST, (4, 16, 8, 8)),
        ("dyt", CHANNELS_LAST, (4, 64, 16)),
    ],
)
def test_saves_only_the_input_and_per_position_statistics(name, layout, shape):
    layer = create_norm(name, 16, layout=layout)
    x = torch.randn(shape, requires_grad=True)
    positions = x.numel() // 16
    assert _saved_bytes(layer, x) <= x.untyped_storage().nbytes() + 2 * 4 * positions
