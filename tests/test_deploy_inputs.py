"""``fold_norms`` on models called with several inputs (a tuple of positional arguments, a dict
of keyword arguments, or the model's own ``example_input_array`` of either kind), on models that
return a tuple or a dict, and on torchvision's ``FrozenBatchNorm2d`` (a look-alike: torchvision
does not install here): the folded model computes what it did and keeps no foldable norm."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from autonorm import fold_norms
from autonorm.deploy import FOLDS_ATTR
from tests.surgery.test_frozen_and_settings import FrozenBatchNorm2d, frozen_net

ATOL = 1e-5


def _as_trained(model: nn.Module, *inputs: torch.Tensor, **named: torch.Tensor) -> nn.Module:
    """Affine weights and running statistics away from their initial values, as after
    training; the model is left in eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        model.train()
        for _ in range(3):
            model(*inputs, **named)
    return model.eval()


class TwoInputNet(nn.Module):
    """``forward(image, features)``: conv -> BN on the image, Linear -> BN1d on the (N, C)
    features, a frozen BN (look-alike) after a second conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.frozen = FrozenBatchNorm2d(6)
        self.proj = nn.Linear(5, 6)
        self.bn_features = nn.BatchNorm1d(6)
        with torch.no_grad():
            self.frozen.weight.uniform_(0.5, 2.0)
            self.frozen.bias.uniform_(-1.0, 1.0)
            self.frozen.running_mean.uniform_(-1.0, 1.0)
            self.frozen.running_var.uniform_(0.5, 2.0)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.frozen(self.conv2(torch.relu(self.bn(self.conv(image)))))
        gate = torch.sigmoid(self.bn_features(self.proj(features)))
        return h.mean((2, 3)) * gate


FOLDABLE = ["bn", "frozen", "bn_features"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 5, generator=gen)


def _assert_folded(model: nn.Module, slots: list[str]) -> None:
    for name in slots:
        assert isinstance(model.get_submodule(name), nn.Identity), name
    assert {f.slot for f in getattr(model, FOLDS_ATTR) if f.reason is None} == set(slots)


def test_a_model_called_with_a_tuple_folds_with_the_same_output():
    image, features = _inputs()
    model = _as_trained(TwoInputNet(), image, features)
    with torch.no_grad():
        expected = model(image, features)
    fold_norms(model, (image, features))
    _assert_folded(model, FOLDABLE)
    with torch.no_grad():
        assert_close(model(image, features), expected, rtol=0, atol=ATOL)


class KeywordNet(TwoInputNet):
    """The same layers, called with keyword arguments only."""

    def forward(self, *, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return super().forward(image, features)


def test_a_model_called_with_a_dict_folds_with_the_same_output():
    image, features = _inputs()
    model = _as_trained(KeywordNet(), image=image, features=features)
    with torch.no_grad():
        expected = model(image=image, features=features)
    fold_norms(model, {"image": image, "features": features})
    _assert_folded(model, FOLDABLE)
    with torch.no_grad():
        assert_close(model(image=image, features=features), expected, rtol=0, atol=ATOL)


def test_the_model_s_own_tuple_or_dict_example_input_is_used():
    """Without an example input, the model's ``example_input_array`` (Lightning's convention:
    a tuple is positional, a dict keyword arguments) finds the feeders and checks the fold."""
    image, features = _inputs()
    for model, example in (
        (TwoInputNet(), (image, features)),
        (KeywordNet(), {"image": image, "features": features}),
    ):
        args, kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
        _as_trained(model, *args, **kwargs)
        model.example_input_array = example
        with torch.no_grad():
            expected = model(*args, **kwargs)
        fold_norms(model)
        _assert_folded(model, FOLDABLE)
        with torch.no_grad():
            assert_close(model(*args, **kwargs), expected, rtol=0, atol=ATOL)


class TupleOutputNet(nn.Module):
    """Returns ``(logits, conv features)``: the first conv's output is also returned as is, so
    folding ``bn`` into it would change the second output; ``bn2`` folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(image + shift)
        return self.bn2(self.conv2(torch.relu(self.bn(h)))).mean((2, 3)), h


class DictOutputNet(TupleOutputNet):
    def forward(self, image: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, h = super().forward(image, shift)
        return {"logits": logits, "features": h}


def test_folds_are_checked_on_every_output_of_a_tuple_or_dict_result():
    """The check compares each element of a tuple or dict output: a fold that changes only
    the second output is undone, the other stays."""
    image, shift = torch.randn(2, 3, 5, 5), torch.randn(1, 3, 1, 1)
    for model in (TupleOutputNet(), DictOutputNet()):
        _as_trained(model, image, shift)
        with torch.no_grad():
            expected = model(image, shift)
        fold_norms(model, (image, shift))
        folds = {f.slot: f for f in getattr(model, FOLDS_ATTR)}
        assert folds["bn2"].reason is None and isinstance(model.bn2, nn.Identity)
        assert "read elsewhere" in folds["bn"].reason and isinstance(model.bn, nn.BatchNorm2d)
        with torch.no_grad():
            assert_close(model(image, shift), expected, rtol=0, atol=ATOL)


def test_torchvision_s_frozen_batchnorm_folds_into_its_conv():
    """A ``FrozenBatchNorm2d`` (weight and bias are buffers, no parameters) after a conv
    without bias: it folds, the conv gains the bias, the output stays."""
    model = frozen_net(eps=1e-3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    fold_norms(model, x)
    assert isinstance(model[1], nn.Identity)
    assert model[0].bias is not None
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert_close(model(x), expected, rtol=0, atol=ATOL)
