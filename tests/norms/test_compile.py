"""``torch.compile(fullgraph=True)`` of every registry layer and of a rewritten model: no graph
break from autonorm's code, and the compiled (inductor, CPU) forward and backward match eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autonorm import apply_config
from autonorm.norms import CHANNELS_FIRST, CHANNELS_LAST, NORM_NAMES, SwitchableNorm, create_norm
from tests import models

SHAPES = {CHANNELS_FIRST: (4, 6, 3, 5), CHANNELS_LAST: (4, 7, 6)}
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomized(module: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def _step(
    run: nn.Module, module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, input gradient and ``module``'s parameter gradients of a step of ``run``."""
    x = x.detach().clone().requires_grad_()
    out = run(x)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), x.grad, grads


def _assert_same_step(eager: nn.Module, compiled_of: nn.Module, x: torch.Tensor) -> None:
    """One training step of ``eager`` and of the compiled ``compiled_of`` (a deep copy of it):
    outputs, input and parameter gradients and the buffers afterwards agree."""
    compiled = torch.compile(compiled_of, fullgraph=True, backend="inductor")
    expected = _step(eager, eager, x)
    got = _step(compiled, compiled_of, x)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, **TOL, msg=name)
    buffers = dict(eager.named_buffers())
    for name, buffer in compiled_of.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], **TOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
@pytest.mark.parametrize("name", NORM_NAMES)
def test_every_registry_layer_compiles_without_graph_breaks(name, layout):
    shape = SHAPES[layout]
    layer = _randomized(create_norm(name, 6, layout=layout, input_ndim=len(shape)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    _assert_same_step(layer, copy.deepcopy(layer), x)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
@pytest.mark.parametrize("kwargs", [{"mixing": "sparsestmax", "radius": 0.3}, {"momentum": None}])
def test_switchable_variants_compile_in_train_and_eval(layout, kwargs):
    layer = _randomized(SwitchableNorm(6, layout=layout, **kwargs))
    x = torch.randn(SHAPES[layout], generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(layer)
    _assert_same_step(layer, twin, x)
    layer.eval()
    twin.eval()
    with torch.no_grad():
        expected = layer(x)
        got = torch.compile(twin, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the new layers have no place")  # rmsnorm has no bias
def test_a_model_after_apply_config_compiles_and_matches_eager():
    model, x = models.resnet()
    config = {
        "bn1": "switchable",
        "layer1.0.bn1": "groupnorm(groups=2)+ws",
        "layer1.0.bn2": "layernorm",
        "layer2.0.bn1": "dyt",
        "layer2.0.bn2": "rmsnorm+wn",
        "layer2.0.downsample.1": "frozenbatchnorm",
    }
    apply_config(model, config, partial=True, example_input=x)
    _randomized(model)
    _assert_same_step(model, copy.deepcopy(model), x)
