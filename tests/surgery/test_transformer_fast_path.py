"""torch's fused ``nn.TransformerEncoder`` inference path: off after a rewrite of its
LayerNorms (it would apply LayerNorm with the new norm's weights), on again when they are
LayerNorms again."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.testing import assert_close

from autonorm import NormConfig, apply_config, find_slots
from tests.models import build, randomize_norms


def aten_ops(model: nn.Module, *args: torch.Tensor) -> set[str]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(*args)
    return {event.name for event in prof.events()}


def slow_path_output(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """The module-by-module output: torch's fused inference paths switched off."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("norm", ["rmsnorm", "groupnorm", "batchnorm", "dyt", "switchable"])
def test_transformer_encoder_does_not_use_fused_layernorm_after_rewrite(norm):
    model, x = build("torch_encoder")
    slots = find_slots(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_config(model, NormConfig.uniform(slots, norm), slots=slots)
    randomize_norms(model)  # a LayerNorm with these weights would differ clearly
    model.eval()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2:] = True
    with torch.no_grad():
        out, masked = model(x), model(x, mask)
    assert_close(out, slow_path_output(model, x))
    assert_close(masked, slow_path_output(model, x, mask))
    if norm == "groupnorm":
        assert "aten::_transformer_encoder_layer_fwd" not in aten_ops(model, x)
        # the fused kernel would apply LayerNorm with the GroupNorm's weights: a different result
        for layer in model.encoder.layers:
            layer.activation_relu_or_gelu = 1
        with torch.no_grad():
            assert not torch.allclose(model(x), out, atol=1e-3)


def test_transformer_encoder_keep_config_keeps_fast_path():
    model, x = build("torch_encoder")
    model.eval()
    slots = find_slots(model, x)
    apply_config(model, NormConfig({s.name: s.keep_choice() for s in slots}), slots=slots)
    assert "aten::_transformer_encoder_layer_fwd" in aten_ops(model, x)
    # a round trip through another norm and back turns it on again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_config(model, NormConfig.uniform(slots, "rmsnorm"), slots=slots)
    assert "aten::_transformer_encoder_layer_fwd" not in aten_ops(model, x)
    assert not model.encoder.use_nested_tensor
    apply_config(model, NormConfig.uniform(find_slots(model, x), "layernorm"), example_input=x)
    assert model.encoder.use_nested_tensor
    assert "aten::_transformer_encoder_layer_fwd" in aten_ops(model, x)
    assert_close(model(x), slow_path_output(model, x), rtol=1e-4, atol=1e-5)
