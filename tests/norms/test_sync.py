"""``syncbatchnorm``: batch norm on one process, global batch statistics over two gloo processes."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from autonorm import NormConfig, apply_config, find_slots
from autonorm.norms import BatchNormChannelsLast, SyncBatchNorm, create_norm
from autonorm.norms import _sync as sync
from tests.models import MODELS
from tests.ports import run_on_ranks

C = 6


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _randomized(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(C, generator=g))
        layer.bias.copy_(torch.randn(C, generator=g))
    return layer


@pytest.mark.parametrize(
    ("layout", "shape", "native"),
    [
        ("channels_first", (4, C, 3, 5), nn.BatchNorm2d(C)),
        ("channels_first", (5, C), nn.BatchNorm1d(C)),
        ("channels_last", (4, 7, C), BatchNormChannelsLast(C)),
    ],
)
def test_one_process_is_batch_norm(layout, shape, native):
    layer = _randomized(create_norm("syncbatchnorm", C, layout=layout))
    assert type(layer) is SyncBatchNorm and layer.layout == layout
    native = _randomized(native)
    for seed in range(3):
        x = _x(shape, seed)
        assert_close(layer(x), native(x))
    assert_close(layer.running_mean, native.running_mean)
    assert_close(layer.running_var, native.running_var)
    layer.eval()
    native.eval()
    assert_close(layer(_x(shape, 5)), native(_x(shape, 5)))
    assert layer.state_dict().keys() == native.state_dict().keys()


def test_torch_syncbatchnorm_trains_on_one_cpu_process_without_a_process_group():
    """What torch does without torch.distributed: plain batch norm (no error)."""
    assert not dist.is_initialized()
    layer = nn.SyncBatchNorm(C)
    assert layer(_x((4, C, 3))).shape == (4, C, 3)


def test_slots_read_syncbatchnorm_back_with_its_settings():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C, momentum=0.2))
    x = _x((2, 3, 4, 4))
    apply_config(model, {"1": "syncbatchnorm(momentum=0.2)"}, example_input=x)
    assert type(model[1]) is SyncBatchNorm
    (slot,) = find_slots(model, x)
    assert (slot.kind, slot.keep_choice().label) == ("syncbatchnorm", "syncbatchnorm(momentum=0.2)")
    torch_sync = nn.Sequential(nn.Conv2d(3, C, 1), nn.SyncBatchNorm(C))
    assert find_slots(torch_sync, x)[0].kind == "syncbatchnorm"
    assert "layout='channels_last'" in repr(SyncBatchNorm(C, layout="channels_last"))


def test_docstring_examples_run():
    result = doctest.testmod(sync, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# -- two gloo processes: the converted model sees the statistics of the whole batch ------------

WORLD = 2
#: model name -> the norm layers' class after the conversion
DIST_MODELS = ("resnet", "pre_ln_transformer")


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    if name == "resnet":
        x = torch.cat([x, _x(x.shape, 9)])  # 8 samples: 4 a process
    return model, x


def _run(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training step's output, gradients and running statistics."""
    model.train()
    inputs = x.float().clone().requires_grad_() if x.is_floating_point() else x
    out = model(inputs)
    out.square().sum().backward()
    result = {"output": out.detach()}
    if x.is_floating_point():
        result["input_grad"] = inputs.grad
    for name, p in model.named_parameters():
        result[f"grad:{name}"] = p.grad.clone()
    for name, b in model.named_buffers():
        if "running" in name:
            result[f"buffer:{name}"] = b.clone()
    return result


def _converted(name: str) -> nn.Module:
    model, x = _model(name)
    slots = find_slots(model, x)
    return apply_config(model, NormConfig.uniform(slots, "syncbatchnorm"), slots=slots)


def _rank_results(rank: int) -> dict:
    results = {}
    for name in DIST_MODELS:
        model = _converted(name)
        _, x = _model(name)
        results[name] = _run(model, x.chunk(WORLD)[rank])
    return results


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    ranks = run_on_ranks(_rank_results, WORLD, tmp_path)
    for name in DIST_MODELS:
        model = _converted(name)
        assert any(isinstance(m, SyncBatchNorm) for m in model.modules())
        single = _run(copy.deepcopy(model), _model(name)[1])  # one process: plain batch norm
        parts = [r[name] for r in ranks]
        for key, value in single.items():
            if key in ("output", "input_grad"):
                assert_close(torch.cat([p[key] for p in parts]), value, msg=f"{name} {key}")
            elif key.startswith("grad:"):  # data parallel sums (or averages) the ranks' gradients
                assert_close(sum(p[key] for p in parts), value, msg=f"{name} {key}")
            else:
                for part in parts:
                    assert_close(part[key], value, msg=f"{name} {key}")
        # per-process batch norm would differ: the test can tell
        local = _run(copy.deepcopy(model), _model(name)[1].chunk(WORLD)[0])
        assert not torch.allclose(local["output"], single["output"].chunk(WORLD)[0])
