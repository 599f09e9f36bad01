"""Configs carry what the probe found, so that a fresh model without an example input is read
the same way; a layout neither settles is refused, never guessed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autonorm import ConfigError, NormConfig, apply_config, find_slots, to_switchable
from autonorm.config import SlotRecord
from autonorm.norms import LayerNormChannelsFirst, SwitchableNorm


class RankLayerNorm(nn.LayerNorm):
    """segmentation-models-pytorch's Segformer LayerNorm: over C of ``(N, C, H, W)``, over the
    last dim otherwise; only a probe tells which one a model uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class Block(nn.Module):
    """conv -> norm -> conv in a forward of its own (no nn.Sequential to read a feeder from)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = RankLayerNorm(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).relu())


X = torch.randn(2, 3, 6, 6)


def test_a_layout_nothing_settles_is_refused_not_guessed():
    model = Block()
    (slot,) = find_slots(model)
    assert slot.unsettled is not None
    with pytest.raises(ConfigError, match="layout is not settled: RankLayerNorm") as info:
        apply_config(model, {"norm": "groupnorm"})
    assert "example input" in str(info.value)
    with pytest.raises(ConfigError, match="layout is not settled"):
        to_switchable(model)
    apply_config(model, {"norm": "layernorm"})  # keeping it needs no layout
    (probed,) = find_slots(model, X)
    assert probed.unsettled is None and probed.layout == "channels_first"


def test_a_config_carries_the_probe_to_a_fresh_model(tmp_path):
    slots = find_slots(Block(), X)
    config = NormConfig.uniform(slots, "groupnorm")
    config.choices["norm"] = config.choices["norm"].with_weight("ws")
    assert config.probe["norm"] == SlotRecord(
        "channels_first", 8, (2, 8, 6, 6), "conv", slots[0].keep_choice().base
    )
    loaded = NormConfig.load(config.save(tmp_path / "cfg.yaml"))
    assert loaded.probe == config.probe
    fresh = Block()
    apply_config(fresh, loaded)  # no example input: the records settle layout and feeder
    assert type(fresh.norm) is nn.GroupNorm
    assert fresh(X).shape == (2, 2, 6, 6)
    (again,) = find_slots(fresh)
    assert again.keep_choice().weight == "ws"


def test_to_switchable_reads_a_configs_records():
    config = NormConfig.uniform(find_slots(Block(), X), "layernorm")
    fresh = to_switchable(Block(), config=config)
    assert isinstance(fresh.norm, SwitchableNorm) and fresh.norm.layout == "channels_first"
    out = fresh(X)
    out.square().mean().backward()
    assert torch.isfinite(fresh.norm.weight.grad).all()


def test_a_probe_wins_over_records_and_other_channel_counts_are_ignored():
    config = NormConfig.uniform(find_slots(Block(), X), "rmsnorm")
    config.metadata["probe"]["norm"]["layout"] = "channels_last"
    model = Block()
    with pytest.warns(UserWarning, match="no place"):  # rmsnorm has no bias
        apply_config(model, config, example_input=X)  # the probe's channels_first wins
    assert model(X).shape == (2, 2, 6, 6)
    config.metadata["probe"]["norm"]["num_features"] = 9
    with pytest.raises(ConfigError, match="not settled"):
        apply_config(Block(), config)


def test_malformed_records_are_named():
    config = NormConfig({"norm": "layernorm"}, metadata={"probe": {"norm": {"layout": "nhwc"}}})
    with pytest.raises(ConfigError, match=r"slot 'norm': `layout` must be one of"):
        apply_config(Block(), config)


def test_a_reached_slot_is_settled_by_its_shape():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), RankLayerNorm(8))
    (slot,) = find_slots(model, X)
    assert slot.layout == "channels_first" and slot.unsettled is None
    apply_config(model, {"1": "layernorm"}, slots=[slot])
    apply_config(model, NormConfig.uniform([slot], "layernorm", eps=1e-3), slots=[slot])
    assert type(model[1]) is LayerNormChannelsFirst
