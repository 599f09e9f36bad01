"""The one map between SwitchableNorm candidates and norm choices, and the one candidate score."""

from __future__ import annotations

import pytest

from autonorm import NormChoice
from autonorm.norms import SWITCHABLE_CANDIDATES
from autonorm.surgery import CANDIDATE_CHOICES, FAMILIES, candidate_scores, family


def test_families_of_choices():
    assert FAMILIES == {
        "channels_first": {
            "batchnorm": "batch",
            "syncbatchnorm": "batch",
            "instancenorm": "instance",
            "groupnorm": "layer",
            "layernorm": "layer",
            "rmsnorm": "layer",
        },
        "channels_last": {
            "batchnorm": "batch",
            "syncbatchnorm": "batch",
            "layernorm": "layer",
            "rmsnorm": "rms",
        },
    }
    assert family(NormChoice("groupnorm", {"groups": 4}), "channels_first") == "layer"
    assert family(NormChoice("dyt"), "channels_last") is None


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_each_candidate_maps_to_a_choice_of_its_own_family(layout):
    assert set(CANDIDATE_CHOICES[layout]) == set(SWITCHABLE_CANDIDATES[layout])
    for candidate, choice in CANDIDATE_CHOICES[layout].items():
        assert family(choice, layout) == candidate


def test_candidate_scores_average_mean_and_variance_weights():
    weights = {"mean": {"layer": 0.2, "batch": 0.8}, "var": {"layer": 0.4, "batch": 0.6}}
    assert candidate_scores(weights) == pytest.approx({"layer": 0.3, "batch": 0.7})
