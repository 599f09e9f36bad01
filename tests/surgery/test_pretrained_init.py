"""``to_switchable(init="original")``: a pretrained model computes nearly what it did at step 0.

The drift is ``||y' - y|| / ||y||`` of the model's output before (``y``) and right after the
rewrite (``y'``), on models whose norms hold pretrained-like values (random affine weights and
running statistics), printed for the report (``pytest -s``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autonorm
from autonorm.callbacks import AutoNorm
from autonorm.norms import SwitchableNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer
from tests.models import resnet

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _pretrained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm affine weights and running statistics away from their fresh values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) or any(
                True for _ in module.children()
            ):
                continue
            for name, fresh in (("weight", 1.0), ("bias", 0.0)):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    t.copy_(fresh + 0.3 * torch.randn(t.shape, generator=g))
            if isinstance(getattr(module, "running_mean", None), torch.Tensor):
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
    return model


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


TOKENS = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(1))


def _drift(build, x, read, init: str, train: bool) -> float:
    torch.manual_seed(0)
    model = _pretrained_like(build()).train(train)
    with torch.no_grad():
        before = read(model(x))
    model = autonorm.to_switchable(model, example_input=x, init=init)
    assert any(isinstance(m, SwitchableNorm) for m in model.modules())
    with torch.no_grad():
        after = read(model(x))
    return float((after - before).norm() / before.norm())


# Transformers in training mode (their norms keep no running statistics: a fresh batch branch's
# running statistics would weigh in at eval); the CNN in eval mode on its running statistics.
CASES = [
    ("resnet (eval)", lambda: resnet()[0], resnet()[1], lambda y: y, False),
    ("bert (train)", _bert, TOKENS, lambda y: y.last_hidden_state, True),
    ("llama (train)", _llama, TOKENS, lambda y: y.logits, True),
]


@pytest.mark.parametrize(("name", "build", "x", "read", "train"), CASES, ids=[c[0] for c in CASES])
def test_original_init_keeps_what_a_pretrained_model_computes(name, build, x, read, train):
    original = _drift(build, x, read, "original", train)
    uniform = _drift(build, x, read, "uniform", train)
    print(f"\nstep-0 output drift of {name}: original {original:.4f}, uniform {uniform:.4f}")
    assert original < 0.02
    assert uniform > 0.1 and uniform > 10 * original


def test_original_init_picks_each_layer_statistic_and_still_learns():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(8, 8), nn.GroupNorm(2, 8),
        nn.InstanceNorm2d(8, affine=True), autonorm.create_norm("dyt", 8, layout="channels_first"),
    )  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"start uniform: \['5 \(dyt\)'\]"):
        autonorm.to_switchable(model, example_input=x, init="original")
    heaviest = {
        name: max(layer.mixing_weights()["mean"].items(), key=lambda kv: kv[1])
        for name, layer in model.named_children()
        if isinstance(layer, SwitchableNorm)
    }
    assert {n: k for n, (k, _) in heaviest.items() if n != "5"} == {
        "1": "batch", "2": "instance", "3": "layer", "4": "instance",
    }  # fmt: skip
    assert all(w == pytest.approx(0.99) for n, (_, w) in heaviest.items() if n != "5")
    assert heaviest["5"][1] == pytest.approx(1 / 3)  # DyT: no statistic computes it
    model.train()
    model(x).square().mean().backward()
    assert model[1].mean_weight.grad.abs().sum() > 0  # not saturated: the mix can still move


def test_original_init_with_sparsestmax_is_a_point_of_the_simplex():
    layer = SwitchableNorm(4, layout="channels_last", mixing="sparsestmax")
    layer.start_on("rms", weight=0.9)
    weights = layer.mixing_weights()["mean"]
    assert weights == pytest.approx({"layer": 0.05, "rms": 0.9, "batch": 0.05})
    with pytest.raises(ValueError, match="`candidate` must be one of"):
        layer.start_on("instance")
    with pytest.raises(ValueError, match="`init` must be one of"):
        autonorm.to_switchable(nn.Sequential(nn.BatchNorm1d(4)), init="pretrained")


def test_callback_learn_mode_starts_on_the_original_norms(tmp_path):
    callback = AutoNorm(mode="learn", init="original", log_mixing_weights=False)
    model = TinyConvNet()
    tiny_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=1).fit(
        model, datamodule=TinyDataModule()
    )
    assert model.bn1.mixing_weights()["mean"]["batch"] > 0.95
    assert model.head_norm.mixing_weights()["mean"]["layer"] > 0.95
    with pytest.raises(ValueError, match="`init` applies to mode='learn' only"):
        AutoNorm(config=autonorm.NormConfig({}), init="original")


def test_eval_mode_starts_near_the_old_output_where_the_norms_kept_no_statistics():
    """A LayerNorm/RMSNorm slot's new batch branch takes its running statistics from the
    example input: the tiny Llama's drift in eval mode (was 0.75 with fresh 0/1 statistics)."""
    drift = _drift(_llama, TOKENS, lambda y: y.logits, "original", train=False)
    print(f"\nstep-0 output drift of llama (eval): original {drift:.4f}")
    assert drift < 0.02
    model = autonorm.to_switchable(_pretrained_like(_llama()), example_input=TOKENS)
    fresh = [m for m in model.modules() if isinstance(m, SwitchableNorm)]
    assert fresh and all(float(m.running_var.sum()) == m.num_features for m in fresh)
