"""SN-guided warm start: narrowing a space and mapping a derived config onto trial parameters."""

from __future__ import annotations

import autonorm
from autonorm.search._warm_start import (
    grid_size,
    random_params,
    warm_start_params,
)
from autonorm.search_spaces import SearchSpace, narrow_space, params_for
from tests.lightning_models import TinyConvNet


def weights(**scores):
    return {"mean": dict(scores), "var": dict(scores)}


def test_narrow_space_drops_choices_the_learned_mix_weighed_low():
    slots = autonorm.find_slots(TinyConvNet())
    learned = {
        "bn1": weights(instance=0.1, layer=0.1, batch=0.8),
        "bn2": weights(instance=0.45, layer=0.1, batch=0.45),
        "head_norm": weights(layer=0.2, rms=0.7, batch=0.1),
    }
    narrowed = narrow_space(SearchSpace("cnn"), slots, learned)
    by_slot = {s.name: [c.label for c in narrowed.choices_for(s)] for s in slots}
    assert by_slot["bn1"] == ["batchnorm", "switchable"]
    assert "instancenorm" in by_slot["bn2"] and "batchnorm" in by_slot["bn2"]
    assert not any(label.startswith("groupnorm") for label in by_slot["bn2"])
    # the slot's own layer (layernorm) stays even though its family scored low
    assert by_slot["head_norm"] == ["layernorm", "rmsnorm"]


def test_params_for_maps_a_derived_config_into_the_space():
    slots = autonorm.find_slots(TinyConvNet())
    params = SearchSpace("cnn").parameters(slots)
    derived = autonorm.NormConfig(
        {"bn1": {"name": "groupnorm", "groups": 1}, "bn2": "batchnorm", "head_norm": "layernorm"}
    )
    chosen = params_for(derived, slots, params)
    assert chosen["bn1"].startswith("groupnorm(") and chosen["bn1"] in params["bn1"][0]
    assert chosen["bn2"] == "batchnorm" and chosen["head_norm"] == "layernorm"
    assert params_for(autonorm.NormConfig({"bn1": "dyt"}), slots, params) is None


def test_random_params_are_seeded_distinct_and_new():
    params = {"a": (["bn", "gn"], ["a"]), "b": (["bn", "gn", "in"], ["b"])}
    taken = [{"a": "bn", "b": "bn"}]
    first = random_params(params, 4, seed=3, taken=taken)
    assert first == random_params(params, 4, seed=3, taken=taken)
    configs = [chosen for _, chosen in first]
    assert len(configs) == 4 and taken[0] not in configs
    assert len({tuple(sorted(c.items())) for c in configs}) == 4
    assert [label for label, _ in first] == ["random:1", "random:2", "random:3", "random:4"]
    # a space with fewer new configs than asked gives what exists
    assert len(random_params({"a": (["bn", "gn"], ["a"])}, 5, seed=0)) == 2


def test_uniform_switchable_is_screened_but_not_part_of_the_hand_run_grid():
    slots = autonorm.find_slots(TinyConvNet())
    params = SearchSpace("cnn").parameters(slots)
    labels = [label for label, _ in warm_start_params(slots, params, None, None)]
    # before the uniform families: where the budget screens only the first few, it is kept
    assert labels.index("uniform:switchable") < labels.index("uniform:groupnorm")
    switchable = dict(warm_start_params(slots, params, None, None))["uniform:switchable"]
    assert switchable == {"bn1": "switchable", "bn2": "switchable", "head_norm": "layernorm"}
    grid = [lb for lb in labels if lb == "own norms" or lb.startswith("uniform:")]
    assert grid_size(slots, params) == len(grid) - 1
    # a space without it has no such baseline
    narrow = SearchSpace(choices={"*": ["batchnorm", "instancenorm"]})
    labels = [lb for lb, _ in warm_start_params(slots, narrow.parameters(slots), None, None)]
    assert "uniform:switchable" not in labels
