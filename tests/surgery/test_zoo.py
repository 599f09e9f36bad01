"""Real users' models, built offline from tiny configs: Hugging Face transformers, MONAI,
timm and torchvision (a detection resnet-FPN backbone with FrozenBatchNorm2d).

Every model is read with and without an example input: the slots found are the norm modules a
person counts (every module whose class names a norm, conv/linear blocks aside), the keep
config rebuilt layer by layer computes what the model computed, and uniform layernorm /
rmsnorm / groupnorm and ``to_switchable`` run forward and backward. timm and torchvision do not
install on the main environment's torch (they pull their own): `.ci/run` runs their cases in a
second environment; in the main one they skip, and a torchvision-style resnet with a
FrozenBatchNorm2d look-alike stands in.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from autonorm import NormConfig, apply_config, find_slots, to_switchable
from autonorm.surgery import build_replacement
from tests.surgery.test_frozen_and_settings import FrozenBatchNorm2d

IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
VOLUME = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
DECODER = dict(TEXT, num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16)


def _transformers() -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def bert() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.BertConfig(intermediate_size=32, max_position_embeddings=16, **TEXT)
    return t.BertModel(config), {"input_ids": IDS}


def gpt2() -> tuple[nn.Module, Any]:
    t = _transformers()
    return t.GPT2Model(t.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)), {
        "input_ids": IDS
    }


def llama() -> tuple[nn.Module, Any]:
    t = _transformers()
    return t.LlamaModel(t.LlamaConfig(**DECODER)), {"input_ids": IDS}


def qwen2() -> tuple[nn.Module, Any]:
    t = _transformers()
    return t.Qwen2Model(t.Qwen2Config(**DECODER)), {"input_ids": IDS}


def gemma() -> tuple[nn.Module, Any]:
    t = _transformers()
    return t.GemmaModel(t.GemmaConfig(head_dim=8, **DECODER)), {"input_ids": IDS}


def t5() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    return t.T5EncoderModel(config), {"input_ids": IDS}


def vit() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    return t.ViTModel(config), {"pixel_values": IMAGES}


def convnext() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    return t.ConvNextModel(config), {"pixel_values": IMAGES}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, norm layer given (detection passes FrozenBatchNorm2d)."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        identity = x if self.downsample is None else self.downsample(x)
        return (out + identity).relu()


class DetectionResNet(nn.Module):
    """A torchvision resnet backbone as detection builds it (norm_layer=FrozenBatchNorm2d)."""

    def __init__(self, norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(8)
        self.layer1 = BasicBlock(8, 8, 1, norm_layer)
        self.layer2 = BasicBlock(8, 16, 2, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.bn1(self.conv1(x)).relu()))


def detection_resnet() -> tuple[nn.Module, Any]:
    model = DetectionResNet()
    generator = torch.Generator().manual_seed(3)
    for buffer in model.buffers():  # pretrained-like statistics and affine
        buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model, IMAGES


def timm_mobilenetv3() -> tuple[nn.Module, Any]:
    """BatchNormAct2d: a BatchNorm2d subclass with the activation inside the norm module."""
    timm = pytest.importorskip("timm")
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3), IMAGES


def timm_convnext() -> tuple[nn.Module, Any]:
    """LayerNorm2d: a channels-first nn.LayerNorm subclass, also inside the classifier head."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    return model, IMAGES


def torchvision_detection_backbone() -> tuple[nn.Module, Any]:
    """The resnet-FPN backbone torchvision's detection models build, FrozenBatchNorm2d norms."""
    pytest.importorskip("torchvision")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

    model = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        norm_layer=TorchvisionFrozenBatchNorm2d,
        trainable_layers=3,
    )
    generator = torch.Generator().manual_seed(3)
    for buffer in model.buffers():  # pretrained-like statistics and affine
        if buffer.is_floating_point():
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model, IMAGES


def monai_unet() -> tuple[nn.Module, Any]:
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=1,
    )
    return model, VOLUME


def monai_segresnet() -> tuple[nn.Module, Any]:
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.SegResNet(
        spatial_dims=2,
        init_filters=8,
        in_channels=1,
        out_channels=2,
        blocks_down=(1, 2),
        blocks_up=(1,),
    )
    return model, VOLUME


ZOO = {
    f.__name__: f
    for f in (
        bert,
        gpt2,
        llama,
        qwen2,
        gemma,
        t5,
        vit,
        convnext,
        detection_resnet,
        timm_mobilenetv3,
        timm_convnext,
        torchvision_detection_backbone,
        monai_unet,
        monai_segresnet,
    )
}


def build(name: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model, example = ZOO[name]()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # trained-like affine weights: a rebuild that drops them shows
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 1:
                weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
    return model, example


def call(model: nn.Module, example: Any) -> torch.Tensor:
    out = model(**example) if isinstance(example, dict) else model(example)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, Mapping):  # a feature pyramid: every level
        return torch.cat([level.flatten(1) for level in out.values()], dim=1)
    return out[0]


def counted_norms(model: nn.Module) -> int:
    """What a person counts: every module whose class names a norm, blocks that hold a conv or
    linear layer aside (timm's ConvNormAct, torchvision's Conv2dNormActivation, a
    NormMlpClassifierHead); a shared one once."""
    blocks = (nn.modules.conv._ConvNd, nn.Linear)
    return len(
        {
            id(m)
            for m in model.modules()
            if "norm" in type(m).__name__.lower()
            and not any(isinstance(c, blocks) for c in m.modules())
        }
    )


def finite_step(model: nn.Module, example: Any) -> None:
    model.train()
    out = call(model, example)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def rebuilt(model: nn.Module, slots: list) -> nn.Module:
    """The model with every slot's layer rebuilt from its keep choice (weights carried)."""
    model = copy.deepcopy(model)
    for slot in slots:
        layer = build_replacement(
            model.get_submodule(slot.name),
            slot.keep_choice().base,
            layout=slot.layout,
            input_ndim=slot.input_ndim,
            extra=slot.extra,
            num_features=slot.num_features,
            weight_offset=slot.weight_offset,
        )
        parent, _, attr = slot.name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    return model


@pytest.mark.parametrize("probe", [True, False], ids=["example", "no-example"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name: str, probe: bool) -> None:
    model, example = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no near miss, no unreached slot
        slots = find_slots(model, example if probe else None)
    assert len(slots) == counted_norms(model) > 0
    assert all(s.unsettled is None and s.refusal is None for s in slots)
    if not probe:  # the classes alone read the model as the probe does (feeders aside)
        probed = find_slots(model, example)
        assert [(s.name, s.kind, s.layout, s.num_features) for s in slots] == [
            (s.name, s.kind, s.layout, s.num_features) for s in probed
        ]
    model.eval()
    with torch.no_grad():
        expected = call(model, example)
        assert_close(call(rebuilt(model, slots), example), expected, rtol=1e-5, atol=1e-5)
        keep = copy.deepcopy(model)
        apply_config(keep, {s.name: s.keep_choice() for s in slots})
        assert_close(call(keep, example), expected, rtol=1e-5, atol=1e-5)
    for norm in ("layernorm", "rmsnorm", "groupnorm"):
        valid = [s for s in slots if not s.check(norm)]
        config = NormConfig.uniform(valid, norm)
        fresh, _ = build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rmsnorm has no place for biases
            # no example input on the fresh model: the config's records (or classes) read it
            fresh = apply_config(fresh, config, partial=True)
        finite_step(fresh, example)
    fresh, _ = build(name)
    fresh = to_switchable(fresh, config=NormConfig.uniform(slots, "switchable"))
    finite_step(fresh, example)


def test_timm_batchnormact_activations_are_held_by_frn_and_given_back() -> None:
    """timm's fused BatchNormAct2d: its ``act`` child is the slot's activation where it is one
    (an Identity is not), frn/evonorm_s0 hold it, batchnorm gives it back."""
    model, example = build("timm_mobilenetv3")
    slots = find_slots(model, example)
    with_act = [s for s in slots if s.activation is not None]
    without = [s for s in slots if s.activation is None]
    assert with_act and without  # timm builds some with apply_act=False: an Identity
    assert all(s.activation == f"{s.name}.act" for s in with_act)
    assert all(isinstance(model.get_submodule(s.name).act, nn.Identity) for s in without)
    acts = {s.name: model.get_submodule(s.name).act for s in with_act}
    config = {  # frn where positions allow (not on the last 1x1 maps), else evonorm_s0
        s.name: "frn" if i % 2 and not s.check("frn") else "evonorm_s0"
        for i, s in enumerate(with_act)
    }
    assert "frn" in config.values()
    apply_config(model, config, partial=True, example_input=example)
    assert all(type(model.get_submodule(n).act).__name__ == "HeldActivation" for n in acts)
    finite_step(model, example)
    apply_config(model, dict.fromkeys(acts, "batchnorm"), partial=True, example_input=example)
    assert all(model.get_submodule(n).act is act for n, act in acts.items())
    finite_step(model, example)
