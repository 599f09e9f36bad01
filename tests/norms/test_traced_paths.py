"""The plain-op paths that ``torch.compile`` and ``torch.export`` trace instead of the fused
autograd functions (:func:`autonorm.norms._fast_ops.tracing`) compute what the fused paths
compute: forward, input and parameter gradients, in float64, for the layers that have both
(SwitchableNorm's statistics and custom backward included).

The traced path is taken here in eager mode through a tensor subclass (what tracing sees: not
a plain ``torch.Tensor``), so each case runs in milliseconds; ``test_compile.py`` checks the
same layers under a real ``torch.compile``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autonorm.norms import CHANNELS_FIRST, CHANNELS_LAST, create_norm
from autonorm.norms._fast_ops import fused_dtype, tracing


class Traced(torch.Tensor):
    """Any tensor subclass: the fused functions read real data, so they take the plain ops."""


#: (registry name, layout, params, input shape): each layer with a fused path and a traced one
CASES = [
    ("layernorm", CHANNELS_FIRST, {}, (3, 6, 4, 5)),
    ("layernorm", CHANNELS_FIRST, {"affine": False}, (2, 6, 7)),
    ("rmsnorm", CHANNELS_FIRST, {}, (3, 6, 4, 5)),
    ("rmsnorm", CHANNELS_FIRST, {"affine": False}, (2, 6, 3, 2, 2)),
    ("rmsnorm", CHANNELS_FIRST, {"eps": 0.5}, (2, 6, 3)),  # an eps that shows in the result
    ("layernorm", CHANNELS_FIRST, {"eps": 0.5}, (2, 6, 3)),
    ("groupnorm", CHANNELS_LAST, {"groups": 3}, (3, 7, 6)),  # 1 < groups < C
    ("groupnorm", CHANNELS_LAST, {"groups": 2}, (2, 3, 4, 6)),  # more than one position dim
    ("groupnorm", CHANNELS_LAST, {"groups": 3, "affine": False}, (2, 5, 6)),
    ("groupnorm", CHANNELS_LAST, {"groups": 6}, (2, 5, 6)),
    ("dyt", CHANNELS_LAST, {}, (3, 5, 6)),
    ("dyt", CHANNELS_FIRST, {"affine": False}, (2, 6, 3, 3)),
    ("switchable", CHANNELS_FIRST, {}, (3, 6, 4, 5)),
    ("switchable", CHANNELS_FIRST, {"candidates": ("instance", "batch")}, (2, 6, 7)),
    ("switchable", CHANNELS_LAST, {}, (3, 5, 6)),
    ("switchable", CHANNELS_LAST, {"candidates": ("layer", "batch")}, (2, 3, 2, 6)),
    ("frn", CHANNELS_FIRST, {}, (3, 6, 4, 5)),
    ("frn", CHANNELS_FIRST, {"affine": False, "eps": 0.5}, (2, 6, 7)),
    ("frn", CHANNELS_LAST, {}, (3, 5, 6)),
    ("frn", CHANNELS_LAST, {"eps": 0.5}, (2, 3, 2, 6)),
    ("evonorm_s0", CHANNELS_FIRST, {"groups": 2}, (3, 6, 4, 5)),
    ("evonorm_s0", CHANNELS_FIRST, {"groups": 3, "affine": False, "eps": 0.5}, (2, 6)),
    ("evonorm_s0", CHANNELS_LAST, {"groups": 3}, (3, 5, 6)),
    ("evonorm_s0", CHANNELS_LAST, {"groups": 6}, (2, 3, 2, 6)),
]


def _layer(name: str, layout: str, params: dict) -> nn.Module:
    layer = create_norm(name, 6, layout=layout, dtype=torch.float64, **params)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 1.0)
    return layer


def _step(layer: nn.Module, x: torch.Tensor, subclass: bool, strided: bool = False):
    """Output, input and parameter gradients; ``strided``: the output's gradient arrives as a
    non-contiguous tensor (a transposed view), as after a ``transpose`` downstream."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    given = x.as_subclass(Traced) if subclass else x
    assert tracing(given) is subclass
    out = layer(given)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    if strided:
        grad = grad.transpose(0, -1).contiguous().transpose(0, -1)
        assert not grad.is_contiguous()
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.as_subclass(torch.Tensor).detach(), x.grad, grads


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-grad", "strided-grad"])
@pytest.mark.parametrize(("name", "layout", "params", "shape"), CASES)
def test_the_traced_path_computes_what_the_fused_one_does(name, layout, params, shape, strided):
    layer = _layer(name, layout, params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2
    assert fused_dtype(x)
    # each from the same buffers (a training step moves SwitchableNorm's running statistics)
    fused = _step(copy.deepcopy(layer), x, subclass=False, strided=strided)
    traced = _step(copy.deepcopy(layer), x, subclass=True, strided=strided)
    torch.testing.assert_close(traced[0], fused[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(traced[1], fused[1], rtol=1e-10, atol=1e-10)
    assert traced[2].keys() == fused[2].keys()
    for key, grad in fused[2].items():
        torch.testing.assert_close(traced[2][key], grad, rtol=1e-10, atol=1e-10, msg=key)


class _SaysWhetherTraced(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (1.0 if tracing(x) else 0.0)


def test_compiling_and_exporting_each_take_the_traced_path():
    """Under ``torch.compile`` and under ``torch.export`` on their own (each the only tracer),
    ``tracing`` is true; in eager mode on a plain tensor it is false."""
    x = torch.zeros(2)
    assert torch.equal(_SaysWhetherTraced()(x), x)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(_SaysWhetherTraced(), backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), x + 1)
    finally:
        torch._dynamo.reset()
    exported = torch.export.export(_SaysWhetherTraced(), (x,)).module()
    assert torch.equal(exported(x), x + 1)


def test_half_precision_and_autocast_keep_torch_s_layers():
    """The fused functions compute in the input's dtype; torch's layers keep float32
    statistics for half precision, so half precision and autocast never take the fused path."""
    x = torch.ones(2, 3)
    assert fused_dtype(x) and fused_dtype(x.double())
    assert not fused_dtype(x.bfloat16()) and not fused_dtype(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_dtype(x)
