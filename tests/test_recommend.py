"""autonorm.recommend (module autonorm.recommendation): rule-based configs for realistic models under a few budgets."""

from __future__ import annotations

import doctest
import importlib
import warnings

import pytest
import torch

from autonorm import Budget, NormConfig, apply_config, find_slots
from autonorm.norms import default_groups, weight_norm_of
from autonorm.recommendation import TASKS, format_reasons, recommend
from tests.models import MODELS


def slots_of(name: str):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    return model, x, find_slots(model, x)


def labels(config: NormConfig) -> dict[str, str]:
    return {name: choice.label for name, choice in config.choices.items()}


RESNET_SLOTS = (
    "bn1",
    "layer1.0.bn1",
    "layer1.0.bn2",
    "layer2.0.bn1",
    "layer2.0.bn2",
    "layer2.0.downsample.1",
)


def test_large_batch_keeps_batchnorm():
    _, _, slots = slots_of("resnet")
    cfg = recommend(slots, Budget(batch_size=64))
    assert labels(cfg) == dict.fromkeys(RESNET_SLOTS, "batchnorm")
    assert "per-device batch 64 >= 16" in cfg.metadata["reasons"]["bn1"]
    assert cfg.metadata["source"] == "recommend"
    assert cfg.metadata["budget"]["batch_size"] == 64
    unknown = recommend(slots)  # no budget: the CNN default, and a hint
    assert set(labels(unknown).values()) == {"batchnorm"}
    assert "Budget(batch_size=...)" in unknown.metadata["reasons"]["bn1"]


def test_small_batch_on_one_device_is_groupnorm_with_ws():
    model, x, slots = slots_of("resnet")
    cfg = recommend(slots, Budget(batch_size=2))
    expected_groups = {8: 2, 16: 4}  # <= 32 groups of >= 4 channels
    assert labels(cfg) == {
        s.name: f"groupnorm(groups={expected_groups[s.num_features]})+ws" for s in slots
    }
    reason = cfg.metadata["reasons"]["layer1.0.bn2"]
    assert "'layer1.0.conv2'" in reason and "Qiao et al. 2019" in reason
    apply_config(model, cfg, slots=slots)
    assert weight_norm_of(model.layer1[0].conv2) == "ws"
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_small_batch_without_a_feeder_is_plain_groupnorm():
    _, _, slots = slots_of("shared")  # one BN applied after two convs: no single feeder
    cfg = recommend(slots, {"batch_size": 4})
    assert labels(cfg) == {"bn": "groupnorm(groups=2)"}
    assert "no weight standardization" in cfg.metadata["reasons"]["bn"]


def test_small_batch_without_a_feeder_but_with_an_activation_is_frn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(8), torch.nn.SiLU()
    )
    x = torch.randn(4, 3, 8, 8)
    slots = find_slots(model, x)
    cfg = recommend(slots, Budget(batch_size=4))
    assert labels(cfg) == {"2": "frn"}
    reason = cfg.metadata["reasons"]["2"]
    assert "replaces the activation '3'" in reason and "Singh & Krishnan 2020" in reason
    apply_config(model, cfg, slots=slots)
    assert type(model[3]).__name__ == "HeldActivation"
    model(x).sum().backward()


def test_small_batch_on_four_devices_is_syncbatchnorm():
    model, x, slots = slots_of("resnet")
    cfg = recommend(slots, Budget(batch_size=2, devices=4))
    assert labels(cfg) == dict.fromkeys(RESNET_SLOTS, "syncbatchnorm")
    reason = cfg.metadata["reasons"]["bn1"]
    assert "global batch of 8" in reason and "compare groupnorm+ws" in reason
    many = recommend(slots, Budget(batch_size=4, devices=8))
    assert "compare" not in many.metadata["reasons"]["bn1"]
    apply_config(model, cfg, slots=slots)
    assert torch.isfinite(model(x)).all()


def test_moderate_batch():
    model, x, slots = slots_of("conv1d")
    cfg = recommend(slots, Budget(batch_size=12))
    assert set(labels(cfg).values()) == {"batchrenorm"}
    assert all("Ioffe 2017" in reason for reason in cfg.metadata["reasons"].values())
    apply_config(model, cfg, slots=slots)
    assert torch.isfinite(model(x)).all()
    assert set(labels(recommend(slots, Budget(batch_size=12, devices=2))).values()) == {
        "syncbatchnorm"
    }


def test_transformer_slots_take_layernorm_and_keep_rmsnorm():
    _, _, slots = slots_of("pre_ln_transformer")
    for budget in (None, Budget(batch_size=2), Budget(batch_size=256, devices=8)):
        cfg = recommend(slots, budget)
        assert labels(cfg) == {
            "blocks.0.ln_1": "layernorm",
            "blocks.0.ln_2": "layernorm",
            "blocks.1.ln_1": "layernorm",
            "blocks.1.ln_2": "layernorm",
            "ln_f": "rmsnorm",
        }
    _, _, encoder = slots_of("torch_encoder")
    assert set(labels(recommend(encoder, Budget(batch_size=2))).values()) == {"layernorm"}


def test_convnext_keeps_its_layernorms_with_their_eps():
    _, _, slots = slots_of("convnext")
    cfg = recommend(slots, Budget(batch_size=64))
    assert set(labels(cfg).values()) == {"layernorm(eps=1e-06)"}
    assert "ConvNeXt" in cfg.metadata["reasons"]["stem.1"]


def test_feature_slots_follow_the_batch():
    _, _, slots = slots_of("mlp")
    assert set(labels(recommend(slots, Budget(batch_size=4))).values()) == {"layernorm"}
    assert set(labels(recommend(slots, Budget(batch_size=32))).values()) == {"batchnorm"}


@pytest.mark.parametrize(("task", "expected"), [("style", "instancenorm"), ("generation", None)])
def test_generation_and_style_tasks(task, expected):
    model, x, slots = slots_of("unet")
    cfg = recommend(slots, Budget(batch_size=64), task=task)
    if expected is None:  # generation: GroupNorm(<=32 groups of >= 4 channels)
        assert labels(cfg)["down1.1"] == "groupnorm(groups=2)"
        assert labels(cfg)["down2.1"] == "groupnorm(groups=4)"
    else:
        assert set(labels(cfg).values()) == {expected}
    assert cfg.metadata["task"] == task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_config(model, cfg, slots=slots)
    assert torch.isfinite(model(x)).all()
    _, _, mlp_slots = slots_of("mlp")  # no positions: the task's conv rule does not apply
    assert set(labels(recommend(mlp_slots, Budget(batch_size=64), task=task)).values()) == {
        "batchnorm"
    }


def test_a_slot_that_cannot_be_rewritten_is_kept():
    _, _, slots = slots_of("fused")
    cfg = recommend(slots, Budget(batch_size=2))
    assert labels(cfg) == {"bn_act": "groupnorm(groups=2)+ws", "doubled": "batchnorm"}
    assert "cannot rewrite" in cfg.metadata["reasons"]["doubled"]


def test_reasons_survive_a_file_and_format_for_printing(tmp_path):
    _, _, slots = slots_of("resnet")
    cfg = recommend(slots, Budget(batch_size=2))
    loaded = NormConfig.load(cfg.save(tmp_path / "recommended.yaml"))
    assert loaded == cfg and loaded.metadata["reasons"] == cfg.metadata["reasons"]
    text = format_reasons(loaded)
    lines = text.splitlines()
    assert len(lines) == len(slots)
    assert lines[0].startswith("bn1                    groupnorm(groups=2)+ws  conv feature map")
    assert len({line.index("groupnorm") for line in lines}) == 1  # aligned columns


def test_bad_arguments():
    _, _, slots = slots_of("resnet")
    with pytest.raises(ValueError, match="`task` must be one of"):
        recommend(slots, task="poetry")
    with pytest.raises(ValueError, match="`budget` must be an autonorm.Budget"):
        recommend(slots, budget=64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no slots"):
        recommend([])


def test_recommended_groups_and_docstrings():
    assert [default_groups(c) for c in (3, 4, 8, 12, 64, 96, 512)] == [1, 1, 2, 3, 16, 24, 32]
    result = doctest.testmod(importlib.import_module("autonorm.recommendation"), verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_the_function_does_not_shadow_its_module():
    import autonorm
    import autonorm.recommendation

    assert autonorm.recommend is recommend
    assert autonorm.recommendation.TASKS == TASKS
