"""Weight-side choices (+ws, +wn): the parametrizations against their formulas, feeder detection
on realistic architectures, paired configs through files and surgery, and search spaces."""

from __future__ import annotations

import copy
import doctest
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

import autonorm.config
import autonorm.norms._weight
import autonorm.search_spaces._space
import autonorm.surgery._apply
import autonorm.surgery._slots
from autonorm import (
    AutoNormError,
    Budget,
    ConfigError,
    NormChoice,
    NormConfig,
    apply_config,
    derive_config,
    find_slots,
    to_switchable,
)
from autonorm.norms import WeightStandardization, set_weight_norm, weight_norm_of
from autonorm.norms._weight import is_feeder, weight_problems
from autonorm.search_spaces import SearchSpace
from autonorm.surgery._rebuild import settled_choice
from tests.models import MODELS, assert_trains, build

# -- the formulas, written out ---------------------------------------------------------------


def standardized(w: torch.Tensor, dim: int = 0, eps: float = 1e-5) -> torch.Tensor:
    """Qiao et al.: per output filter, (w - mean) / sqrt(biased var + eps)."""
    w = w.movedim(dim, 0)
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape).movedim(0, dim)


def weight_normalized(g: torch.Tensor, v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Salimans & Kingma: w = g * v / ||v||, the norm per output filter."""
    moved = v.movedim(dim, 0)
    norms = moved.reshape(moved.shape[0], -1).norm(dim=1)
    shape = [1] * v.dim()
    shape[dim] = -1
    return g.reshape(shape) * v / norms.reshape(shape)


LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 6, 6), 0),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, bias=False), (2, 4, 9), 0),
    "linear": (lambda: nn.Linear(7, 4), (3, 7), 0),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 5, 2, 2), (2, 3, 4, 4), 1),
}


def _layer(name: str) -> tuple[nn.Module, torch.Tensor, int]:
    make, shape, dim = LAYERS[name]
    torch.manual_seed(0)
    return make(), torch.randn(shape), dim


@pytest.mark.parametrize("name", LAYERS)
def test_weight_standardization_matches_the_formula(name):
    layer, x, dim = _layer(name)
    raw = layer.weight.detach().clone() * 3 + 0.7  # a scale and shift WS must remove
    with torch.no_grad():
        layer.weight.copy_(raw)
    reference = copy.deepcopy(layer)
    set_weight_norm(layer, "ws")
    assert weight_norm_of(layer) == "ws"
    assert_close(layer.weight, standardized(raw, dim))
    assert_close(layer.parametrizations.weight.original, raw)  # the raw weight is what learns
    with torch.no_grad():
        reference.weight.copy_(standardized(raw, dim))
    assert_close(layer(x), reference(x))
    filters = layer.weight.detach().movedim(dim, 0).flatten(1)
    assert_close(filters.mean(1), torch.zeros(filters.shape[0]), atol=1e-6, rtol=0)
    assert_close(filters.var(1, correction=0), torch.ones(filters.shape[0]), atol=1e-3, rtol=0)


def test_weight_standardization_gradient_flows_through_the_standardization():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    ws = WeightStandardization(eps=1e-5)
    assert torch.autograd.gradcheck(ws, (w,))
    assert_close(ws(w), standardized(w))


def test_weight_standardization_in_half_precision_and_its_eps():
    w = torch.randn(4, 8) * 1e-3
    assert_close(WeightStandardization(eps=1e-2)(w), standardized(w, eps=1e-2))
    half = WeightStandardization()(w.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert_close(half.float(), standardized(w.to(torch.bfloat16).float()), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="`eps` must be > 0"):
        WeightStandardization(eps=0)


@pytest.mark.parametrize("name", LAYERS)
def test_weight_normalization_matches_the_formula_and_keeps_the_function(name):
    layer, x, dim = _layer(name)
    before = layer(x).detach()
    set_weight_norm(layer, "wn")
    assert weight_norm_of(layer) == "wn"
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    norms = v.detach().movedim(dim, 0).flatten(1).norm(dim=1)
    assert_close(g.detach().flatten(), norms)  # g starts at ||w||: the function is kept
    assert_close(layer(x), before)
    with torch.no_grad():
        g.mul_(torch.linspace(0.5, 2, g.numel()).reshape(g.shape))
        v.add_(0.3)
    assert_close(layer.weight, weight_normalized(g.detach(), v.detach(), dim))


def test_switching_weight_norms_keeps_what_the_layer_computes():
    layer, x, _ = _layer("conv2d")
    set_weight_norm(layer, "ws")
    standardized_out = layer(x).detach()
    set_weight_norm(layer, "wn")  # WN starts from the standardized weight: same function
    assert_close(layer(x), standardized_out)
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(2)
    learned = layer.parametrizations.weight.original0.detach().clone()
    set_weight_norm(layer, "wn")  # the same choice again keeps its learned g
    assert_close(layer.parametrizations.weight.original0, learned)
    doubled = layer(x).detach()
    set_weight_norm(layer, None)
    assert type(layer) is nn.Conv2d and not parametrize.is_parametrized(layer)
    assert_close(layer(x), doubled)  # the weight it computed stays
    assert weight_norm_of(layer) is None


def test_parametrized_feeder_keeps_requires_grad_device_and_deepcopies():
    layer, x, _ = _layer("conv2d")
    layer.weight.requires_grad_(False)
    set_weight_norm(layer, "ws")
    assert not layer.parametrizations.weight.original.requires_grad
    set_weight_norm(layer, "wn")
    assert not any(p.requires_grad for n, p in layer.named_parameters() if "weight" in n)
    clone = copy.deepcopy(layer)
    assert weight_norm_of(clone) == "wn"
    assert_close(clone(x), layer(x))


def test_what_is_not_a_feeder_and_refused_changes():
    assert not is_feeder(nn.ConvTranspose2d(4, 4, 2, groups=2))
    assert not is_feeder(nn.LazyConv2d(4, 3))
    assert not is_feeder(nn.Embedding(4, 4))
    assert is_feeder(nn.ConvTranspose1d(4, 4, 2))
    with pytest.raises(ValueError, match="weight-side normalization needs a Conv1d/2d/3d"):
        set_weight_norm(nn.Embedding(3, 4), "ws")
    with pytest.raises(ValueError, match="ws needs more than one weight per output filter"):
        set_weight_norm(nn.Conv2d(1, 4, 1), "ws")
    assert weight_problems(nn.Conv2d(1, 4, 1), "wn") == []
    spectral = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
    with pytest.raises(
        ValueError, match=r"parametrizations autonorm did not add \(_SpectralNorm\)"
    ):
        set_weight_norm(spectral, "ws")
    with pytest.raises(ValueError, match="unknown weight normalization 'bn'"):
        set_weight_norm(nn.Linear(4, 4), "bn")


def test_deprecated_weight_norm_hook_is_read_and_removed():
    layer, x, _ = _layer("linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(layer)
    assert weight_norm_of(layer) == "wn"
    before = layer(x).detach()
    set_weight_norm(layer, "ws")
    assert weight_norm_of(layer) == "ws" and not hasattr(layer, "weight_g")
    set_weight_norm(layer, None)
    assert layer(x).shape == before.shape


@pytest.mark.parametrize(
    "module",
    [
        autonorm.norms._weight,
        autonorm.config,
        autonorm.surgery._slots,
        autonorm.surgery._apply,
        autonorm.search_spaces._space,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# -- a WS conv + GN model trains at batch 2 ----------------------------------------------------


def test_ws_conv_with_groupnorm_trains_at_batch_two():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    stripes = (torch.arange(8) % 2).float().expand(8, 8)  # vertical stripes; .T horizontal
    y = torch.arange(16) % 2
    x = torch.stack([stripes if label else stripes.T for label in y]).unsqueeze(1)
    x = x + 0.5 * torch.randn(x.shape)
    cfg = NormConfig({"1": "groupnorm(groups=2)+ws", "4": "groupnorm(groups=2)+ws"})
    apply_config(model, cfg, example_input=x[:2])
    assert [weight_norm_of(model[i]) for i in (0, 3)] == ["ws", "ws"]
    assert isinstance(model[1], nn.GroupNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        idx = torch.arange(2 * step, 2 * step + 2) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


# -- feeders found by the probe ------------------------------------------------------------------

#: model -> {slot: feeder}: None where the input comes from an add, a mean, an embedding, or from
#: two layers (a norm applied at two places).
EXPECTED_FEEDERS = {
    "resnet": {
        "bn1": "conv1",
        "layer1.0.bn1": "layer1.0.conv1",
        "layer1.0.bn2": "layer1.0.conv2",
        "layer2.0.bn1": "layer2.0.conv1",
        "layer2.0.bn2": "layer2.0.conv2",
        "layer2.0.downsample.1": "layer2.0.downsample.0",
    },
    "convnext": {
        "stem.1": "stem.0",
        "stage1.0.norm": "stage1.0.dwconv",  # a permuted view of the conv's output
        "downsample.0": None,  # after the residual add
        "stage2.0.norm": "stage2.0.dwconv",
        "head_norm": None,  # after global pooling
    },
    "unet": {
        "down1.1": "down1.0",
        "down1.4": "down1.3",
        "down2.1": "down2.0",
        "down2.4": "down2.3",
        "up1.1": "up1.0",
        "up1.4": "up1.3",
    },
    "pre_ln_transformer": {
        "blocks.0.ln_1": None,  # embeddings + positions
        "blocks.0.ln_2": None,  # residual adds
        "blocks.1.ln_1": None,
        "blocks.1.ln_2": None,
        "ln_f": None,
    },
    "torch_encoder": {
        **{f"encoder.layers.{i}.norm{j}": None for i in range(3) for j in (1, 2)},
        "encoder.norm": None,
    },
    "mlp": {"net.1": "net.0", "net.4": "net.3"},
    "conv1d": {"bn1": "conv1", "bn2": "conv2"},
    "shared": {"bn": None},  # fed by `conv` at one place and `branch.0` at the other
    "fused": {"bn_act": "conv1", "doubled": "conv2"},
}


@pytest.mark.parametrize("name", MODELS)
def test_probe_finds_each_slots_feeder(name):
    model, x = build(name)
    assert {s.name: s.feeder for s in find_slots(model, x)} == EXPECTED_FEEDERS[name]


def test_a_tensor_changed_in_place_after_the_conv_has_no_feeder():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn(F.relu(self.conv(x), inplace=True))  # same object, other values
            return self.bn2(self.conv2(x).flatten(2))  # a view, not a permutation

    feeders = {s.name: s.feeder for s in find_slots(InPlace(), torch.randn(2, 3, 4, 4))}
    assert feeders == {"bn": None, "bn2": None}


def test_without_a_probe_sequentials_give_feeders():
    model, _ = build("resnet")
    feeders = {s.name: s.feeder for s in find_slots(model, probe=False)}
    assert feeders["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert feeders["bn1"] is None  # called from a custom forward: unknown without a probe
    unet, _ = build("unet")
    assert {s.name: s.feeder for s in find_slots(unet)} == EXPECTED_FEEDERS["unet"]


def test_declared_feeders_argument_and_model_attribute():
    model, x = build("pre_ln_transformer")
    slots = find_slots(model, x, feeders={"ln_f": None, "blocks.0.ln_2": "blocks.0.attn.out_proj"})
    assert {s.name: s.feeder for s in slots}["blocks.0.ln_2"] == "blocks.0.attn.out_proj"
    resnet, rx = build("resnet")
    resnet.autonorm_feeders = {"bn1": None}  # overrides the probe
    assert {s.name: s.feeder for s in find_slots(resnet, rx)}["bn1"] is None
    with pytest.raises(AutoNormError) as info:
        find_slots(
            model,
            x,
            feeders={
                "nope": "head",
                "ln_f": "missing",
                "blocks.0.ln_1": "tok",
                "blocks.1.ln_1": "head",
            },
        )
    message = str(info.value)
    assert "'nope' is not a norm slot" in message
    assert "the model has no module 'missing'" in message
    assert "'tok' is a Embedding" in message
    assert "feeder 'head' has 17 output channels, the slot normalizes 16" in message


# -- paired configs: files, surgery, keep choices ------------------------------------------------


def conv_config(name: str, choice: str) -> NormConfig:
    model, x = build(name)
    return NormConfig({s.name: choice for s in find_slots(model, x) if s.feeder is not None})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_paired_configs_round_trip_through_files(tmp_path, suffix):
    cfg = NormConfig(
        {
            "a": "groupnorm(groups=8)+ws",
            "b": {"name": "identity", "weight": "wn"},
            "c": "batchnorm+ws",
            "d": "layernorm",
        },
        metadata={"source": "test"},
    )
    path = cfg.save(tmp_path / f"cfg{suffix}")
    loaded = NormConfig.load(path)
    assert loaded == cfg
    assert loaded["a"] == NormChoice("groupnorm", {"groups": 8}, "ws")
    assert loaded.to_dict()["slots"] == {
        "a": {"name": "groupnorm", "groups": 8, "weight": "ws"},
        "b": "identity+wn",
        "c": "batchnorm+ws",
        "d": "layernorm",
    }
    assert NormChoice.parse(loaded["a"].label) == loaded["a"]


def test_hand_written_pairs_and_bad_weight_parts(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        "slots:\n  a: groupnorm(groups=4) + ws\n  b: {name: batchnorm, weight: wn}\n"
    )
    loaded = NormConfig.load(tmp_path / "cfg.yaml")
    assert [loaded[k].label for k in "ab"] == ["groupnorm(groups=4)+ws", "batchnorm+wn"]
    with pytest.raises(ConfigError) as info:
        NormConfig({"a": "groupnorm+sw", "b": {"name": "batchnorm", "weight": 1}})
    assert "unknown weight normalization 'sw'" in str(info.value)
    assert "`weight` must be 'ws' or 'wn', got 1" in str(info.value)


@pytest.mark.parametrize(
    ("name", "choice"),
    [
        ("resnet", "groupnorm(groups=4)+ws"),
        ("resnet", "batchnorm+wn"),
        ("convnext", "layernorm+ws"),
        ("unet", "identity+wn"),
        ("mlp", "layernorm+ws"),
        ("conv1d", "batchnorm+ws"),
        (
            "fused",
            "batchnorm+ws",
        ),  # the unreproducible slot keeps its layer: only its feeder changes
    ],
)
def test_paired_configs_apply_to_the_feeders(name, choice):
    model, x = build(name)
    slots = find_slots(model, x)
    cfg = NormConfig({s.name: choice for s in slots if s.feeder is not None})
    parsed = NormChoice.parse(choice)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity drops the affine weights
        model = apply_config(model, cfg, partial=True, slots=slots)
    for slot in slots:
        feeder = model.get_submodule(slot.feeder) if slot.feeder else None
        if slot.name in cfg:
            assert weight_norm_of(feeder) == parsed.weight
            assert parametrize.is_parametrized(feeder, "weight")
    assert_trains(model, x)
    again = {s.name: s.keep_choice() for s in find_slots(model, x)}
    before = {s.name: s.keep_choice() for s in slots}
    # keep choices carry the pair (and the settings a same-family choice kept: LayerNorm2d's eps)
    assert all(again[n] == settled_choice(c, before[n]) for n, c in cfg.choices.items())


def test_keep_config_of_a_paired_model_changes_nothing_and_reapplying_replaces_it():
    model, x = build("resnet")
    apply_config(model, NormConfig.uniform(find_slots(model, x), "groupnorm", groups=4).choices)
    paired = NormConfig({n: "groupnorm(groups=4)+ws" for n in EXPECTED_FEEDERS["resnet"]})
    apply_config(model, paired, example_input=x)
    modules = list(model.modules())
    parametrizations = model.conv1.parametrizations.weight[0]
    apply_config(model, {s.name: s.keep_choice() for s in find_slots(model, x)}, example_input=x)
    assert list(model.modules()) == modules
    assert model.conv1.parametrizations.weight[0] is parametrizations
    # the same config again: nothing to do; a config without weight parts removes them
    apply_config(model, paired, example_input=x)
    assert model.conv1.parametrizations.weight[0] is parametrizations
    model.eval()
    with torch.no_grad():
        before = model(x)
    apply_config(model, NormConfig.uniform(EXPECTED_FEEDERS["resnet"], "groupnorm", groups=4))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        assert_close(model(x), before)  # the standardized weights stay: same function
    assert all(s.keep_choice().weight is None for s in find_slots(model, x))


def test_weight_part_only_leaves_the_norm_module_alone():
    model, x = build("resnet")
    bn = model.bn1
    apply_config(model, {"bn1": "batchnorm+ws"}, partial=True, example_input=x)
    assert model.bn1 is bn and weight_norm_of(model.conv1) == "ws"


def test_weight_parts_found_again_without_a_probe_and_when_wrapped():
    model, x = build("resnet")
    cfg = {"bn1": "batchnorm+wn", "layer1.0.bn1": "batchnorm+ws"}
    apply_config(model, cfg, partial=True, example_input=x)
    keep = {s.name: s.keep_choice().label for s in find_slots(model)}  # no probe: from the tags
    assert keep["bn1"] == "batchnorm+wn" and keep["layer1.0.bn1"] == "batchnorm+ws"
    wrapper = nn.Sequential(nn.Identity(), model)
    keep = {s.name: s.keep_choice().label for s in find_slots(wrapper)}
    assert keep["1.bn1"] == "batchnorm+wn" and keep["1.layer1.0.bn1"] == "batchnorm+ws"
    inner = {s.name: s.feeder for s in find_slots(wrapper[1].layer1)}
    assert inner["0.bn1"] == "0.conv1"


def test_fresh_model_takes_a_paired_structure_and_its_state_dict():
    """What checkpoint restore does: apply the structure to a fresh model, then load weights."""
    model, x = build("unet")
    cfg = NormConfig({s.name: "groupnorm(groups=2)+ws" for s in find_slots(model, x)})
    apply_config(model, cfg, example_input=x)
    structure = NormConfig({s.name: s.keep_choice() for s in find_slots(model)})
    state = model.state_dict()
    assert "down1.0.parametrizations.weight.original" in state
    fresh, _ = build("unet")
    apply_config(fresh, NormConfig.from_dict(structure.to_dict()))  # no example input
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert_close(fresh(x), model(x))


def test_weight_part_problems_are_collected_and_leave_the_model_unchanged():
    model, x = build("shared")  # one norm fed by two convs: no feeder
    with pytest.raises(ConfigError, match="ws needs the Conv/Linear layer that feeds the slot"):
        apply_config(model, {"bn": "batchnorm+ws"}, example_input=x)
    transformer, tx = build("pre_ln_transformer")
    modules = list(transformer.modules())
    cfg = {s.name: "layernorm+wn" for s in find_slots(transformer, tx)}
    with pytest.raises(ConfigError) as info:
        apply_config(transformer, cfg, example_input=tx)
    assert str(info.value).count("wn needs the Conv/Linear layer") == 5
    assert list(transformer.modules()) == modules


def test_slots_sharing_a_feeder_must_agree():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.a = nn.BatchNorm2d(4)
            self.b = nn.GroupNorm(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.a(h) + self.b(h)

    model, x = TwoHeads(), torch.randn(2, 3, 5, 5)
    assert {s.name: s.feeder for s in find_slots(model, x)} == {"a": "conv", "b": "conv"}
    with pytest.raises(ConfigError, match=r"slots sharing the feeder 'conv' need the same weight"):
        apply_config(model, {"a": "batchnorm+ws"}, partial=True, example_input=x)
    apply_config(model, {"a": "batchnorm+ws", "b": "groupnorm(groups=2)+ws"}, example_input=x)
    assert weight_norm_of(model.conv) == "ws"


def test_foreign_parametrization_on_a_feeder_is_refused_in_one_message():
    model, x = build("conv1d")
    nn.utils.parametrizations.spectral_norm(model.conv1)
    with pytest.raises(ConfigError, match="parametrizations autonorm did not add"):
        apply_config(model, {"bn1": "batchnorm+ws", "bn2": "batchnorm"}, example_input=x)
    assert weight_norm_of(model.conv2) is None


def test_switchable_round_trip_keeps_the_weight_part():
    model, x = build("resnet")
    apply_config(model, {n: "batchnorm+ws" for n in EXPECTED_FEEDERS["resnet"]}, example_input=x)
    to_switchable(model, example_input=x)
    assert weight_norm_of(model.conv1) == "ws"
    derived = derive_config(model, example_input=x)
    assert all(c.weight == "ws" for c in derived.choices.values())


# -- search spaces -------------------------------------------------------------------------------


def test_presets_unchanged_by_default_and_weight_norms_add_pairs():
    model, x = build("resnet")
    slot = find_slots(model, x)[0]
    plain = [c.label for c in SearchSpace("cnn").choices_for(slot)]
    assert not any("+" in label for label in plain)
    paired = [c.label for c in SearchSpace("cnn", weight_norms=True).choices_for(slot)]
    assert paired[: len(plain)] == plain
    assert paired[len(plain) :] == ["batchnorm+ws", "groupnorm(groups=2)+ws", "identity+wn"]
    transformer, tx = build("pre_ln_transformer")
    token_slot = find_slots(transformer, tx)[0]
    space = SearchSpace("transformer", weight_norms=True)
    assert not any(c.weight for c in space.choices_for(token_slot))  # no feeder: no pairs


def test_rules_with_pairs_are_filtered_per_slot():
    model, x = build("convnext")
    rules = {"*": ["layernorm", "layernorm+ws", "identity+wn"]}
    space = SearchSpace("auto", choices=rules, keep=False)
    choices = space.resolve(find_slots(model, x))
    assert [c.label for c in choices["stem.1"]] == ["layernorm", "layernorm+ws", "identity+wn"]
    assert [c.label for c in choices["head_norm"]] == ["layernorm"]
    labels, names = space.parameters(find_slots(model, x))["stem.1"]
    assert (labels, names) == (["layernorm", "layernorm+ws", "identity+wn"], ["stem.1"])


def test_devices_add_syncbatchnorm_to_presets():
    model, x = build("resnet")
    slot = find_slots(model, x)[0]
    one = [c.label for c in SearchSpace("cnn").for_budget(Budget(batch_size=2)).choices_for(slot)]
    assert "syncbatchnorm" not in one
    space = SearchSpace("cnn").for_budget(Budget(batch_size=2, devices=4))
    many = [c.label for c in space.choices_for(slot)]
    assert many[:2] == ["batchnorm", "syncbatchnorm"]
    assert space.to_dict()["devices"] == 4
    assert SearchSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()
    both = SearchSpace("cnn", weight_norms=True, devices=2).choices_for(slot)
    assert NormChoice("syncbatchnorm", weight="ws") in both
    with pytest.raises(ConfigError, match="`devices` must be a positive int"):
        SearchSpace(devices=0)
    with pytest.raises(ConfigError, match="`weight_norms` must be true or false"):
        SearchSpace.from_dict({"weight_norms": "yes"})


def test_apply_config_takes_declared_feeders():
    model, x = build("pre_ln_transformer")
    feeders = {"blocks.0.ln_2": "blocks.0.attn.out_proj"}
    apply_config(model, {"blocks.0.ln_2": "layernorm+ws"}, partial=True, feeders=feeders)
    assert weight_norm_of(model.blocks[0].attn.out_proj) == "ws"
    assert {s.name: s.keep_choice().label for s in find_slots(model)}["blocks.0.ln_2"] == (
        "layernorm+ws"
    )
