"""NormChoice parsing and labels; NormConfig construction, equality and YAML/JSON files."""

from __future__ import annotations

import json

import pytest
import yaml

from autonorm import NORM_NAMES, ConfigError, NormChoice, NormConfig
from autonorm.config import SCHEMA_VERSION

# -- NormChoice --------------------------------------------------------------------------------


def test_parse_name_label_mapping_and_choice():
    assert NormChoice.parse("layernorm") == NormChoice("layernorm")
    gn = NormChoice("groupnorm", {"groups": 8})
    assert NormChoice.parse("groupnorm(groups=8)") == gn
    assert NormChoice.parse(" groupnorm( groups = 8 ) ") == gn
    assert NormChoice.parse({"name": "groupnorm", "groups": 8}) == gn
    assert NormChoice.parse(gn) is gn
    assert NormChoice.parse("groupnorm(groups=8)").params["groups"] == 8  # an int, not "8"


def test_parse_switchable_candidates():
    expected = NormChoice("switchable", {"candidates": ("instance", "batch")})
    assert NormChoice.parse("switchable(candidates=[instance, batch])") == expected
    assert NormChoice.parse({"name": "switchable", "candidates": ["instance", "batch"]}) == expected
    assert NormChoice.parse("switchable(candidates=[layer, rms], momentum=0.05)").params == {
        "candidates": ("layer", "rms"),
        "momentum": 0.05,
    }
    assert expected.to_value() == {"name": "switchable", "candidates": ["instance", "batch"]}


@pytest.mark.parametrize(
    "choice",
    [
        NormChoice("identity"),
        NormChoice("groupnorm", {"groups": 8}),
        NormChoice("groupnorm", {"groups": 1, "eps": 1e-6, "affine": False}),
        NormChoice("layernorm", {"eps": 1e-5}),
        NormChoice("batchnorm", {"momentum": None, "track_running_stats": False}),
        NormChoice("batchnorm", {"momentum": 0.01}),
        NormChoice("switchable", {"candidates": ["instance", "layer"], "momentum": 0.2}),
        NormChoice("dyt", {"alpha_init": 0.8}),
    ],
    ids=lambda c: c.label,
)
def test_labels_and_values_round_trip(choice):
    assert NormChoice.parse(choice.label) == choice
    assert NormChoice.parse(choice.label).label == choice.label
    assert NormChoice.parse(choice.to_value()) == choice
    assert NormChoice.parse(yaml.safe_load(yaml.safe_dump(choice.to_value()))) == choice
    assert NormChoice.parse(json.loads(json.dumps(choice.to_value()))) == choice
    assert str(choice) == choice.label


def test_labels_list_params_in_sorted_order():
    choice = NormChoice("batchnorm", {"momentum": 0.01, "affine": False})
    assert choice.label == "batchnorm(affine=false, momentum=0.01)"
    assert NormChoice("groupnorm").label == "groupnorm"
    assert hash(choice) == hash(NormChoice.parse(choice.label))
    assert len({choice, NormChoice.parse(choice.label)}) == 1


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'fancynorm'") as info:
        NormChoice.parse("fancynorm")
    for name in NORM_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown norm 'weird'"):
        NormChoice.parse({"name": "weird"})


def test_unknown_parameter():
    with pytest.raises(ValueError, match=r"groupnorm takes parameters .*got unknown \['group'\]"):
        NormChoice.parse("groupnorm(group=8)")
    with pytest.raises(ValueError, match=r"got unknown \['alpha_init'\]"):
        NormChoice("layernorm", {"alpha_init": 0.5})


@pytest.mark.parametrize(
    "value",
    ["groupnorm(8)", "groupnorm(groups=8", "2groupnorm", "", {"groups": 8}, 3, None],
)
def test_malformed_choices(value):
    with pytest.raises(ValueError):
        NormChoice.parse(value)


# -- NormConfig --------------------------------------------------------------------------------


def test_uniform_config():
    config = NormConfig.uniform(["a.bn", "b.bn", "c.ln"], "groupnorm", groups=4)
    assert list(config) == ["a.bn", "b.bn", "c.ln"]
    assert set(config.choices.values()) == {NormChoice("groupnorm", {"groups": 4})}
    assert config.metadata == {"source": "uniform:groupnorm(groups=4)"}
    assert len(config) == 3 and "a.bn" in config and "z" not in config
    with pytest.raises(ValueError, match="unknown norm"):
        NormConfig.uniform(["a"], "nonorm")


def test_equality_is_on_choices_not_metadata():
    a = NormConfig({"x": "layernorm", "y": "groupnorm(groups=2)"}, metadata={"trial": 1})
    b = NormConfig({"y": {"name": "groupnorm", "groups": 2}, "x": "layernorm"})
    assert a == b
    assert a != NormConfig({"x": "layernorm", "y": "groupnorm(groups=4)"})
    assert repr(a) == "NormConfig({'x': 'layernorm', 'y': 'groupnorm(groups=2)'})"


def test_invalid_choices_all_named():
    with pytest.raises(ConfigError) as info:
        NormConfig({"a": "fancynorm", "b": "layernorm", "c": "groupnorm(grups=2)", 7: "dyt"})
    message = str(info.value)
    assert "slot 'a': unknown norm 'fancynorm'" in message
    assert "slot 'c': groupnorm takes parameters" in message
    assert "slot names must be strings, got 7" in message
    assert "'b'" not in message
    with pytest.raises(ConfigError, match="must map slot names"):
        NormConfig(["a", "b"])


def test_root_slot_name_is_allowed():
    assert NormConfig({"": "layernorm"})[""] == NormChoice("layernorm")


# -- files -------------------------------------------------------------------------------------

METADATA = {
    "source": "search",
    "trial": 12,
    "value": 0.913,
    "space": {"name": "cnn", "tie": ["layer1.*"]},
    "model_class": "tests.models.SmallResNet",
}


def sample_config() -> NormConfig:
    return NormConfig(
        {
            "": "identity",
            "bn1": "groupnorm(groups=8)",
            "layer1.0.bn1": {"name": "layernorm", "eps": 1e-6},
            "layer1.0.bn2": "switchable(candidates=[instance, batch])",
            "layer2.0.bn1": "batchnorm(momentum=null, affine=false)",
            "head.norm": "rmsnorm",
        },
        metadata=METADATA,
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json", ".YAML"])
def test_save_load_round_trip(tmp_path, suffix):
    config = sample_config()
    path = config.save(tmp_path / "nested" / f"best{suffix}")
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    loaded = NormConfig.load(path)
    assert loaded == config
    assert list(loaded) == list(config)
    assert loaded.metadata == METADATA
    assert loaded["layer2.0.bn1"].params == {"affine": False, "momentum": None}
    assert loaded["layer1.0.bn1"].params == {"eps": 1e-6}
    text = path.read_text()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["slots"]["bn1"] == {"name": "groupnorm", "groups": 8}
    assert data["slots"]["head.norm"] == "rmsnorm"


def test_hand_written_yaml_with_labels(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("slots:\n  bn1: groupnorm(groups=4)\n  fc.norm: layernorm\n")
    loaded = NormConfig.load(path)
    assert loaded == NormConfig({"bn1": "groupnorm(groups=4)", "fc.norm": "layernorm"})
    assert loaded.metadata == {}


def test_other_suffixes_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"must end in \.yaml, \.yml, \.json, got .*best\.txt"):
        sample_config().save(tmp_path / "best.txt")
    assert not (tmp_path / "best.txt").exists()
    (tmp_path / "best.txt").write_text("slots:\n  a: layernorm\n")
    with pytest.raises(ConfigError, match=r"must end in"):
        NormConfig.load(tmp_path / "best.txt")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*absent.yaml"):
        NormConfig.load(tmp_path / "absent.yaml")


def test_malformed_yaml_and_json_name_the_file(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("slots:\n  bn1: [groupnorm\n  fc: layernorm\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad\.yaml' is not valid YAML"):
        NormConfig.load(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"slots": {"bn1": "groupnorm",}}')
    with pytest.raises(ConfigError, match=r"config file '.*bad\.json' is not valid JSON"):
        NormConfig.load(bad_json)


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_wrong_schema_version_and_missing_slots_in_one_message(tmp_path):
    path = write_yaml(tmp_path, {"schema_version": 2, "metadata": {}})
    with pytest.raises(ConfigError) as info:
        NormConfig.load(path)
    message = str(info.value)
    assert message.startswith(f"config file {str(path)!r}")
    assert "schema_version must be 1, got 2" in message
    assert "`slots` is missing" in message
    for data, phrase in [
        ({"schema_version": True, "slots": {"a": "dyt"}}, "schema_version must be 1, got True"),
        ({"slots": ["a", "b"]}, "`slots` must map slot names to choices"),
        ({"slots": {"a": "dyt"}, "metadata": [1]}, "`metadata` must be a mapping"),
        ({"slots": {"a": "dyt"}, "extra": 1}, r"unknown keys \['extra'\]"),
        (["slots"], "expected a mapping with `slots`"),
    ]:
        with pytest.raises(ConfigError, match=phrase):
            NormConfig.load(write_yaml(tmp_path, data))


def test_invalid_choices_in_a_file_name_the_file_and_every_slot(tmp_path):
    data = {
        "schema_version": 1,
        "slots": {
            "bn1": "groupnorm(groups=4)",
            "layer1.bn": "superNorm",
            "layer2.bn": {"name": "batchnorm", "momentm": 0.1},
            "head": {"groups": 2},
        },
    }
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        NormConfig.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "slot 'layer1.bn': unknown norm 'superNorm'" in message
    assert "slot 'layer2.bn': batchnorm takes parameters" in message
    assert "slot 'head': a choice mapping needs a `name` string" in message
    assert "'bn1'" not in message


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    with pytest.raises(ConfigError, match="is not valid YAML"):
        NormConfig.load(path)
    path.write_text("slots:\n  bn1: !!python/object:autonorm.config.NormChoice {name: dyt}\n")
    with pytest.raises(ConfigError, match="python/object"):
        NormConfig.load(path)
    assert not marker.exists()


def test_to_dict_and_from_dict():
    config = sample_config()
    data = config.to_dict()
    assert list(data) == ["schema_version", "metadata", "slots"]
    assert NormConfig.from_dict(data) == config
    assert NormConfig.from_dict(data).metadata == METADATA
    assert NormConfig.from_dict({"slots": {}}) == NormConfig({})


def test_a_learned_configs_weights_and_mixing_are_read_typed_from_its_metadata(tmp_path):
    import torch

    import autonorm
    from autonorm.norms import SwitchableNorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), SwitchableNorm(4, mixing="sparsestmax"))
    derived = autonorm.derive_config(model, example_input=torch.randn(2, 3, 6, 6))
    derived.save(tmp_path / "learned.yaml")
    loaded = autonorm.NormConfig.load(tmp_path / "learned.yaml")  # stored as plain YAML
    assert loaded.learned_mixing == "sparsestmax"
    weights = loaded.learned_weights["1"]
    assert set(weights) == {"mean", "var"} and sum(weights["mean"].values()) == pytest.approx(1)
    assert autonorm.NormConfig({"a": "layernorm"}).learned_weights == {}
    broken = autonorm.NormConfig({"a": "layernorm"}, metadata={"weights": {"a": ["x"]}})
    with pytest.raises(ConfigError, match="must map slot names to mixing weights"):
        _ = broken.learned_weights
