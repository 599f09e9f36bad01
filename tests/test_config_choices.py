"""Norm choices as a user writes them: each parameter checked the same way in a label, in
``create_norm`` and in a config file; labels with parameters in ``NormConfig.uniform``."""

from __future__ import annotations

import pytest
import torch

import autonorm
from autonorm import ConfigError, NormChoice, NormConfig
from tests.models import resnet

BAD_PARAMS = {
    "batchnorm(eps=inf)": "`eps` must be a finite number > 0",
    "layernorm(eps=nan)": "`eps` must be a finite number > 0",
    "batchnorm(eps=0)": "`eps` must be a finite number > 0",
    "batchnorm(eps=true)": "`eps` must be a finite number > 0",
    "batchnorm(momentum=-0.1)": r"`momentum` must be a number in \[0, 1\] or None",
    "batchnorm(momentum=1.5)": r"`momentum` must be a number in \[0, 1\]",
    "instancenorm(momentum=fast)": r"`momentum` must be a number in \[0, 1\]",
    "batchnorm(track_running_stats=0)": "`track_running_stats` must be true or false",
    "groupnorm(groups=0)": "`groups` must be a positive int",
    "groupnorm(groups=2.0)": "`groups` must be a positive int",
    "dyt(alpha_init=inf)": "`alpha_init` must be a finite number",
}


@pytest.mark.parametrize("label", list(BAD_PARAMS))
def test_bad_choice_parameters_are_refused_everywhere(label, tmp_path):
    choice_error = BAD_PARAMS[label]
    with pytest.raises(ValueError, match=choice_error):
        NormChoice.parse(label)
    name, _, args = label.partition("(")
    key, _, raw = args.rstrip(")").partition("=")
    with pytest.raises(ValueError, match=choice_error):
        autonorm.create_norm(name, 8, **{key: _value(raw)})
    path = tmp_path / "cfg.yaml"
    path.write_text(f"slots:\n  bn1:\n    name: {name}\n    {key}: {raw}\n")
    with pytest.raises(ConfigError, match=rf"(?s)cfg.yaml.*slot 'bn1'.*{choice_error}"):
        NormConfig.load(path)


def _value(raw: str):
    return {"inf": float("inf"), "nan": float("nan"), "true": True, "fast": "fast"}.get(
        raw, float(raw) if "." in raw else int(raw) if raw.lstrip("-").isdigit() else raw
    )


def test_a_quoted_false_is_not_taken_as_true(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text('slots:\n  bn1:\n    name: layernorm\n    affine: "false"\n')
    with pytest.raises(ConfigError, match="`affine` must be true or false, got affine='false'"):
        NormConfig.load(path)
    path.write_text("slots:\n  bn1:\n    name: layernorm\n    affine: false\n")
    assert NormConfig.load(path)["bn1"].params == {"affine": False}
    with pytest.raises(ValueError, match="`affine` must be true or false"):
        autonorm.create_norm("layernorm", 8, affine="false")


def test_valid_choice_parameters_load():
    choice = NormChoice.parse("batchnorm(eps=1e-05, momentum=None, track_running_stats=false)")
    assert choice.params == {"eps": 1e-05, "momentum": None, "track_running_stats": False}
    assert NormChoice.parse("batchnorm(momentum=0)").params == {"momentum": 0}
    layer = autonorm.create_norm("batchnorm", 8, momentum=1.0, eps=1e-3)
    assert (layer.momentum, layer.eps) == (1.0, 1e-3)


def test_uniform_takes_a_label_and_adds_params_to_it():
    model, x = resnet()
    slots = autonorm.find_slots(model, x)
    config = autonorm.NormConfig.uniform(slots, "groupnorm+ws", groups=2)
    assert {c.label for c in config.choices.values()} == {"groupnorm(groups=2)+ws"}
    assert config == autonorm.NormConfig(dict.fromkeys(config.choices, "groupnorm(groups=2)+ws"))
    autonorm.apply_config(model, config)
    assert torch.isfinite(model(x)).all()
    with pytest.raises(ValueError, match="unknown norm 'groupnrom'; valid names are"):
        autonorm.NormConfig.uniform(slots, "groupnrom+ws")


@pytest.mark.parametrize("raw", ["layernorm(device=cpu)", "groupnorm(groups=2, dtype=float16)"])
def test_device_and_dtype_are_refused_when_a_choice_is_parsed(raw, tmp_path):
    """A rewrite builds each layer on its slot's device and dtype: a choice carrying them would
    fail later in apply_config with 'got multiple values'."""
    message = r"are not choice parameters: a rewrite builds each layer on the device and dtype"
    with pytest.raises(ValueError, match=message):
        NormChoice.parse(raw)
    path = tmp_path / "cfg.yaml"
    path.write_text(f"slots:\n  bn1: '{raw}'\n")
    with pytest.raises(ConfigError, match=rf"(?s)cfg.yaml.*slot 'bn1'.*{message}"):
        NormConfig.load(path)
