"""Per-slot evidence by perturbation: forcing each SwitchableNorm slot's candidates one at a
time on a trained model finds the config that computes what a known target computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autonorm import NormChoice
from autonorm.norms import SwitchableNorm
from autonorm.surgery import find_slots, perturb_slots, to_switchable


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
    )


def test_perturbation_recovers_the_candidates_a_target_computes_with():
    x = torch.randn(16, 2, 12) * 3 + 1
    model = _net()
    example = x[:4]
    to_switchable(model, example_input=example)
    layers = [m for m in model.modules() if isinstance(m, SwitchableNorm)]
    with torch.no_grad():  # mixing weights as training would leave them: no candidate obvious
        for layer, logits in zip(layers, ([0.2, 0.1, 0.0], [0.0, 0.15, 0.1]), strict=True):
            layer.mean_weight.copy_(torch.tensor(logits))
            layer.var_weight.copy_(torch.tensor(logits))
        model.train()
        model(x)  # running statistics for the batch branch
    model.eval()
    with layers[0].only("batch"), layers[1].only("layer"), torch.no_grad():
        target = model(x)  # what the discrete config (batch, layer) computes

    calls = []

    def validate(m: nn.Module) -> float:
        calls.append(1)
        with torch.no_grad():
            return -float((m(x) - target).pow(2).mean())

    slots = find_slots(model, example)
    evidence = perturb_slots(model, slots, validate, maximize=True)
    assert evidence.choices == {
        "1": NormChoice("batchnorm"),
        "4": NormChoice("groupnorm", {"groups": 1}),
    }
    assert evidence.joint == pytest.approx(0.0, abs=1e-10)  # the target itself
    assert evidence.base < evidence.joint
    # base, 2 slots x 3 candidates, the open slot again, the joint config
    assert evidence.passes == len(calls) == 1 + 6 + 3 + 1
    assert set(evidence.scores[evidence.order[0]]) == {
        "instancenorm",
        "groupnorm(groups=1)",
        "batchnorm",
    }
    # the learned logits are back as trained
    assert torch.allclose(layers[0].mean_weight, torch.tensor([0.2, 0.1, 0.0]))
    assert evidence.config().choices == evidence.choices


def test_a_model_without_switchable_slots_is_refused():
    model = _net()
    with pytest.raises(ValueError, match="no slot holds a SwitchableNorm"):
        perturb_slots(model, find_slots(model, torch.randn(2, 2, 8)), lambda m: 0.0, maximize=True)


def test_only_computes_with_one_candidate_and_restores_the_mix():
    layer = SwitchableNorm(4).eval()
    x = torch.randn(3, 4, 5)
    mixed = layer(x)
    with layer.only("instance"):
        alone = layer(x)
    assert torch.allclose(alone, nn.functional.instance_norm(x, eps=1e-5), atol=1e-6)
    assert torch.equal(layer(x), mixed)
    with pytest.raises(ValueError, match="`candidate` must be one of"), layer.only("rms"):
        pass
