"""The contract every registered norm passes, and the layer-specific equivalences."""

from __future__ import annotations

import copy
import doctest
import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from autonorm.norms import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    NORM_NAMES,
    DyT,
    GroupNormChannelsLast,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
    SwitchableNorm,
    create_norm,
)
from autonorm.norms import _groups as groups
from autonorm.norms import _layers as layers
from autonorm.norms import _registry as registry
from autonorm.norms import _switchable as switchable

C = 6

#: (id, layout, input shape, input_ndim given to the registry: None builds rank-agnostic layers)
CASES = [
    ("cf-4d", CHANNELS_FIRST, (4, C, 3, 5), 4),
    ("cf-3d-any-rank", CHANNELS_FIRST, (4, C, 7), None),
    ("cl-tokens", CHANNELS_LAST, (4, 7, C), 3),
]


def _contract_params():
    return [
        pytest.param(name, layout, shape, ndim, id=f"{name}-{case}")
        for name in NORM_NAMES
        for case, layout, shape, ndim in CASES
    ]


def _build(name, layout, ndim, **kwargs):
    return create_norm(name, C, layout=layout, input_ndim=ndim, **kwargs)


def _randomize(layer: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _input(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_registry_names_are_the_documented_choices():
    assert NORM_NAMES == (
        "batchnorm",
        "syncbatchnorm",
        "frozenbatchnorm",
        "groupnorm",
        "instancenorm",
        "layernorm",
        "rmsnorm",
        "switchable",
        "dyt",
        "batchrenorm",
        "frn",
        "evonorm_s0",
        "identity",
    )


@pytest.mark.parametrize(("name", "layout", "shape", "ndim"), _contract_params())
class TestNormContract:
    """One contract, every registry name, both layouts."""

    def test_shape_dtype_and_backward(self, name, layout, shape, ndim):
        layer = _build(name, layout, ndim)
        x = _input(shape).requires_grad_()
        out = layer(x)
        assert out.shape == x.shape
        assert out.dtype == x.dtype
        out.square().sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(x.grad).all()
        for p in layer.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()

    def test_train_eval(self, name, layout, shape, ndim):
        layer = _build(name, layout, ndim)
        _randomize(layer)
        x = _input(shape)
        assert layer.train() is layer and layer.training
        layer(x)
        layer(_input(shape, seed=3))
        assert layer.eval() is layer and not layer.training
        assert all(not m.training for m in layer.modules())
        before = _state(layer)
        with torch.no_grad():
            out = layer(x)
            first = layer(x[:1])
        assert torch.isfinite(out).all()
        # in eval every norm is per sample: sample 0 does not see the rest of the batch
        torch.testing.assert_close(first, out[:1])
        # and eval leaves the state (running statistics) alone
        after = layer.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)

    def test_state_dict_round_trip(self, name, layout, shape, ndim):
        layer = _build(name, layout, ndim)
        _randomize(layer)
        for seed in range(3):  # move running statistics away from their initial values
            layer(_input(shape, seed=seed))
        fresh = _build(name, layout, ndim)
        fresh.load_state_dict(layer.state_dict())
        x = _input(shape, seed=7)
        for mode in (True, False):
            layer.train(mode)
            fresh.train(mode)
            with torch.no_grad():
                torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    def test_dtype_kwarg(self, name, layout, shape, ndim, dtype):
        layer = _build(name, layout, ndim, dtype=dtype)
        reference = _build(name, layout, ndim)
        _randomize(reference)
        layer.load_state_dict(reference.state_dict())
        for t in [*layer.parameters(), *layer.buffers()]:
            if t.is_floating_point():
                assert t.dtype == dtype
        x = _input(shape).requires_grad_()
        xd = x.detach().to(dtype).requires_grad_()
        out = layer(xd)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        out.float().square().sum().backward()
        assert xd.grad.dtype == dtype and torch.isfinite(xd.grad).all()
        for p in layer.parameters():
            assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()
        expected = reference(x)
        tol = (
            {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float64 else {"rtol": 5e-2, "atol": 8e-2}
        )
        torch.testing.assert_close(out.float(), expected, **tol)

    def test_gradcheck(self, name, layout, shape, ndim):
        layer = _build(name, layout, ndim, dtype=torch.float64)
        _randomize(layer)
        tiny = (
            (2, C, 2, 2)
            if len(shape) == 4
            else ((2, C, 3) if layout == CHANNELS_FIRST else (2, 3, C))
        )
        x = _input(tiny, dtype=torch.float64).requires_grad_()
        names = [n for n, _ in layer.named_parameters()]
        params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

        def fn(x, *params):
            return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

        assert torch.autograd.gradcheck(fn, (x, *params))

    def test_reset_parameters_and_extra_repr(self, name, layout, shape, ndim):
        torch.manual_seed(0)
        layer = _build(name, layout, ndim)
        initial = _state(layer)
        _randomize(layer)
        layer(_input(shape))
        layer.reset_parameters()
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(value, initial[key], rtol=0, atol=0, msg=key)
        text = layer.extra_repr()
        assert isinstance(text, str) and str(C) in text
        assert str(C) in repr(layer)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'batchnrom'") as info:
        create_norm("batchnrom", C)
    for name in NORM_NAMES:
        assert name in str(info.value)


def test_unknown_layout_and_parameters_are_refused():
    with pytest.raises(ValueError, match="`layout` must be one of"):
        create_norm("layernorm", C, layout="nhwc")
    with pytest.raises(ValueError, match=r"layernorm takes parameters .* got unknown \['groups'\]"):
        create_norm("layernorm", C, groups=2)


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
def test_groups_must_divide_channels(layout):
    with pytest.raises(ValueError, match="must divide") as info:
        create_norm("groupnorm", C, layout=layout, groups=4)
    assert "groups=4" in str(info.value) and f"num_features={C}" in str(info.value)
    layer = create_norm("groupnorm", C, layout=layout, groups=3)
    assert layer.num_groups == 3


def test_registry_returns_native_layers_for_a_known_rank():
    assert type(create_norm("batchnorm", C, input_ndim=4)) is nn.BatchNorm2d
    assert type(create_norm("batchnorm", C, input_ndim=3)) is nn.BatchNorm1d
    assert type(create_norm("instancenorm", C, input_ndim=5)) is nn.InstanceNorm3d
    assert type(create_norm("groupnorm", C)) is nn.GroupNorm
    assert type(create_norm("layernorm", C, layout=CHANNELS_LAST)) is nn.LayerNorm
    assert type(create_norm("rmsnorm", C, layout=CHANNELS_LAST)) is nn.RMSNorm
    assert (
        type(create_norm("groupnorm", C, layout=CHANNELS_LAST, groups=2)) is GroupNormChannelsLast
    )


def test_groupnorm_channels_last_equals_native_after_permute():
    layer = create_norm("groupnorm", C, layout=CHANNELS_LAST, groups=3)
    _randomize(layer)
    native = nn.GroupNorm(3, C)
    native.load_state_dict(layer.state_dict())
    x = _input((2, 4, 5, C))
    torch.testing.assert_close(layer(x), native(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    ("name", "native_cls", "cls"),
    [
        ("layernorm", nn.LayerNorm, LayerNormChannelsFirst),
        ("rmsnorm", nn.RMSNorm, RMSNormChannelsFirst),
    ],
)
def test_channels_first_token_norms_equal_native_over_c(name, native_cls, cls):
    layer = create_norm(name, C, layout=CHANNELS_FIRST, eps=1e-6)
    assert type(layer) is cls
    _randomize(layer)
    native = native_cls(C, eps=1e-6)
    native.load_state_dict(layer.state_dict())
    x = _input((2, C, 3, 4)).requires_grad_()
    xn = x.detach().clone().requires_grad_()
    out = layer(x)
    expected = native(xn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, xn.grad)


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
def test_dyt_is_gamma_tanh_alpha_x_plus_beta(layout):
    layer = create_norm("dyt", C, layout=layout)
    assert isinstance(layer, DyT)
    assert layer.alpha.shape == (1,) and layer.alpha.item() == 0.5
    torch.testing.assert_close(layer.weight.detach(), torch.ones(C))
    torch.testing.assert_close(layer.bias.detach(), torch.zeros(C))
    _randomize(layer)
    x = _input((2, C, 3) if layout == CHANNELS_FIRST else (2, 3, C))
    view = (1, C, 1) if layout == CHANNELS_FIRST else (1, 1, C)
    gamma, beta = layer.weight.view(view), layer.bias.view(view)
    expected = gamma * torch.tanh(layer.alpha * x) + beta
    torch.testing.assert_close(layer(x), expected)


def test_dyt_alpha_init_and_no_affine():
    layer = create_norm("dyt", C, layout=CHANNELS_LAST, alpha_init=2.0, affine=False)
    assert layer.weight is None and layer.bias is None
    x = _input((2, 3, C))
    torch.testing.assert_close(layer(x), torch.tanh(2.0 * x))
    with pytest.raises(ValueError, match="`alpha_init` must be a finite number"):
        DyT(C, alpha_init=float("nan"))


def test_create_norm_accepts_a_class_and_a_partial():
    layer = create_norm(nn.BatchNorm2d, C, eps=1e-3)
    assert type(layer) is nn.BatchNorm2d and layer.num_features == C and layer.eps == 1e-3

    layer = create_norm(functools.partial(nn.BatchNorm1d, momentum=0.3), C)
    assert type(layer) is nn.BatchNorm1d and layer.momentum == 0.3

    # factories that take a layout get the slot's layout
    layer = create_norm(DyT, C, layout=CHANNELS_FIRST)
    assert layer.layout == CHANNELS_FIRST
    partial = functools.partial(SwitchableNorm, candidates=("layer", "batch"))
    layer = create_norm(partial, C, layout=CHANNELS_LAST)
    assert isinstance(layer, SwitchableNorm)
    assert layer.layout == CHANNELS_LAST and layer.candidates == ("layer", "batch")

    with pytest.raises(ValueError, match="a registry name, a class or a factory"):
        create_norm(42, C)  # type: ignore[arg-type]


def test_identity_passes_input_through_and_keeps_the_slot():
    layer = create_norm("identity", C, layout=CHANNELS_LAST, eps=1e-3)
    x = _input((2, 3, C))
    assert layer(x) is x
    assert layer.num_features == C and layer.layout == CHANNELS_LAST
    assert list(layer.parameters()) == [] and copy.deepcopy(layer).num_features == C


@pytest.mark.parametrize("module", [groups, layers, registry, switchable], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(("name", "layout", "shape", "ndim"), _contract_params())
def test_output_is_laid_out_as_the_native_layer_of_its_layout(name, layout, shape, ndim):
    """Channels-last layers return a contiguous tensor as nn.LayerNorm does (GPT-2 views its
    norms' outputs); autonorm's channels-first ones keep the memory format BatchNorm keeps
    (torch's own layers, which the registry returns where they exist, do what they do)."""
    layer = _build(name, layout, ndim).train()
    x = _input(shape)
    assert layer(x).is_contiguous()
    if (
        layout == CHANNELS_FIRST
        and len(shape) == 4
        and type(layer).__module__.startswith("autonorm")
    ):
        x = x.contiguous(memory_format=torch.channels_last)
        native = nn.BatchNorm2d(C)(x)
        out = layer(x)
        assert out.is_contiguous(memory_format=torch.channels_last) == native.is_contiguous(
            memory_format=torch.channels_last
        )
