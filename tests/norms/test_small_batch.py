"""The small-batch family against references written from the papers' equations: forward within
1e-5, input and parameter gradients, gradcheck, both layouts, parameters validated."""

from __future__ import annotations

import pytest
import torch

from autonorm.norms import BatchRenorm, EvoNormS0, FilterResponseNorm, create_norm

torch.manual_seed(0)


def _to_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).contiguous()


def renorm_reference(x, running_mean, running_var, weight, bias, r_max, d_max, eps):
    """Ioffe 2017, Algorithm 1 (training): r and d are constants for the gradient."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    sigma_b = (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    sigma = (running_var + eps).sqrt().reshape(shape)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean.reshape(shape)) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mean) / sigma_b * r + d
    return x_hat * weight.reshape(shape) + bias.reshape(shape)


def frn_reference(x, weight, bias, tau, eps):
    """Singh & Krishnan 2020, eq. 1-3 (channels first)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    nu2 = (x * x).mean(dim=tuple(range(2, x.dim())), keepdim=True)
    y = weight.reshape(shape) * x / (nu2 + eps).sqrt() + bias.reshape(shape)
    return torch.max(y, tau.reshape(shape))


def evonorm_reference(x, weight, bias, v, groups, eps):
    """Liu et al. 2020, EvoNorm-S0 (channels first): x * sigmoid(v x) / group_std(x)."""
    n, c = x.shape[:2]
    shape = [1, -1] + [1] * (x.dim() - 2)
    grouped = x.reshape(n, groups, -1)
    var = grouped.var(dim=2, unbiased=False, keepdim=True)
    std = (var + eps).sqrt().expand_as(grouped).reshape(x.shape)
    return x * torch.sigmoid(v.reshape(shape) * x) / std * weight.reshape(shape) + bias.reshape(
        shape
    )


def _randomize(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() and p is layer.weight else 0.0))


def _gradients(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list:
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (5, 4, 7), (3, 4, 2, 3, 2)])
def test_batch_renorm_matches_the_paper_after_its_ramp(shape):
    layer = BatchRenorm(4, r_max=1.5, d_max=0.3, warmup_steps=0, ramp_steps=1).double()
    _randomize(layer)
    layer.num_batches_tracked.fill_(1)  # past the ramp: r_max and d_max at their limits
    layer.running_mean.copy_(torch.randn(4, dtype=torch.double))
    layer.running_var.copy_(torch.rand(4, dtype=torch.double) * 3 + 0.1)
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = (torch.randn(shape, dtype=torch.double) * 2 + 0.5).requires_grad_()
    out = layer(x)
    ref_x = x.detach().clone().requires_grad_()
    w, b = (
        layer.weight.detach().clone().requires_grad_(),
        layer.bias.detach().clone().requires_grad_(),
    )
    ref = renorm_reference(ref_x, before_mean, before_var, w, b, 1.5, 0.3, 1e-5)
    assert torch.allclose(out, ref, atol=1e-10)
    got = _gradients(out, [x, layer.weight, layer.bias])
    want = _gradients(ref, [ref_x, w, b])
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r, atol=1e-10)
    # the corrections clip: the output differs from a plain batch norm's
    plain = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True)
    assert not torch.allclose(out, plain, atol=1e-3)
    # running statistics as BatchNorm's: momentum towards the batch mean and unbiased variance
    dims = [d for d in range(x.dim()) if d != 1]
    assert torch.allclose(layer.running_mean, 0.9 * before_mean + 0.1 * x.mean(dims))
    assert torch.allclose(layer.running_var, 0.9 * before_var + 0.1 * x.var(dims, unbiased=True))
    assert int(layer.num_batches_tracked) == 2


def test_batch_renorm_channels_last_matches_channels_first():
    first = BatchRenorm(4, r_max=2.0, d_max=1.0, warmup_steps=0, ramp_steps=1).double()
    last = BatchRenorm(
        4, r_max=2.0, d_max=1.0, warmup_steps=0, ramp_steps=1, layout="channels_last"
    )
    last.double().load_state_dict(first.state_dict())
    for layer in (first, last):
        layer.running_mean.fill_(0.7)
        layer.num_batches_tracked.fill_(1)
    x = torch.randn(3, 4, 5, 6, dtype=torch.double)
    assert torch.allclose(_to_last(first(x)), last(_to_last(x)), atol=1e-12)
    assert torch.allclose(first.running_var, last.running_var)
    first.eval(), last.eval()
    assert torch.allclose(_to_last(first(x)), last(_to_last(x)), atol=1e-12)


def test_batch_renorm_is_batch_norm_in_warmup_and_inference():
    layer = BatchRenorm(4)  # the paper's 5000 warm-up steps
    bn = torch.nn.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3)
    assert torch.allclose(layer(x), bn(x), atol=1e-5)
    assert torch.allclose(layer.running_var, bn.running_var, atol=1e-6)
    layer.eval(), bn.eval()
    assert torch.allclose(layer(x), bn(x), atol=1e-5)
    x64 = torch.randn(6, 4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(BatchRenorm(4).double(), (x64,))


def test_batch_renorm_schedule():
    layer = BatchRenorm(4, r_max=3.0, d_max=5.0, warmup_steps=10, ramp_steps=20)
    assert layer.limits() == (1.0, 0.0)
    layer.num_batches_tracked.fill_(20)
    assert layer.limits() == pytest.approx((2.0, 2.5))
    layer.num_batches_tracked.fill_(100)
    assert layer.limits() == (3.0, 5.0)
    layer.scale_schedule(1000)  # a given schedule stays
    assert (layer.warmup_steps, layer.ramp_steps) == (10, 20)
    default = BatchRenorm(4)
    assert (default.warmup_steps, default.ramp_steps) == (5000, 20000)
    default.scale_schedule(1000)
    assert (default.warmup_steps, default.ramp_steps) == (50, 200)


@pytest.mark.parametrize("shape", [(2, 4, 5, 3), (3, 4, 7), (2, 4, 2, 3, 2)])
def test_frn_matches_the_paper(shape):
    layer = FilterResponseNorm(4).double()
    _randomize(layer)
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    params = [layer.weight, layer.bias, layer.tau]
    ref = frn_reference(x, *params, 1e-6)
    out = layer(x)
    assert torch.allclose(out, ref, atol=1e-10)
    for g, r in zip(_gradients(out, [x, *params]), _gradients(ref, [x, *params]), strict=True):
        assert torch.allclose(g, r, atol=1e-10)
    assert torch.autograd.gradcheck(layer, (x,))
    last = FilterResponseNorm(4, layout="channels_last").double()
    last.load_state_dict(layer.state_dict())
    assert torch.allclose(last(_to_last(x)), _to_last(out), atol=1e-12)
    assert torch.autograd.gradcheck(last, (_to_last(x.detach()).requires_grad_(),))


@pytest.mark.parametrize("shape", [(2, 8, 5, 3), (3, 8, 7), (3, 8)])
def test_evonorm_s0_matches_the_paper(shape):
    layer = EvoNormS0(8, groups=2).double()
    _randomize(layer)
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    params = [layer.weight, layer.bias, layer.v]
    ref = evonorm_reference(x, *params, 2, 1e-5)
    out = layer(x)
    assert torch.allclose(out, ref, atol=1e-10)
    for g, r in zip(_gradients(out, [x, *params]), _gradients(ref, [x, *params]), strict=True):
        assert torch.allclose(g, r, atol=1e-10)
    assert torch.autograd.gradcheck(layer, (x,))
    last = EvoNormS0(8, groups=2, layout="channels_last").double()
    last.load_state_dict(layer.state_dict())
    assert torch.allclose(last(_to_last(x)), _to_last(out), atol=1e-12)
    assert torch.autograd.gradcheck(last, (_to_last(x.detach()).requires_grad_(),))


def test_float32_forward_within_1e_5_of_the_float64_reference():
    x = torch.randn(4, 8, 6, 6)
    frn, evo = FilterResponseNorm(8), EvoNormS0(8, groups=4)
    _randomize(frn), _randomize(evo)
    want = frn_reference(x.double(), *(p.double() for p in (frn.weight, frn.bias, frn.tau)), 1e-6)
    assert (frn(x).double() - want).abs().max() < 1e-5
    params = (evo.weight, evo.bias, evo.v)
    want = evonorm_reference(x.double(), *(p.double() for p in params), 4, 1e-5)
    assert (evo(x).double() - want).abs().max() < 1e-5


def test_registry_builds_and_validates_them():
    assert isinstance(create_norm("batchrenorm", 8, r_max=2.0), BatchRenorm)
    assert create_norm("evonorm_s0", 64).groups == 16  # groupnorm's default count
    assert create_norm("frn", 8, layout="channels_last").eps == 1e-6
    with pytest.raises(ValueError, match=r"`r_max` must be a finite number >= 1, got r_max=0.5"):
        create_norm("batchrenorm", 8, r_max=0.5)
    with pytest.raises(
        ValueError, match=r"`warmup_steps` must be an int >= 0, got warmup_steps=1.5"
    ):
        create_norm("batchrenorm", 8, warmup_steps=1.5)
    with pytest.raises(ValueError, match=r"`ramp_steps` must be an int >= 1, got ramp_steps=0"):
        create_norm("batchrenorm", 8, ramp_steps=0)
    with pytest.raises(ValueError, match=r"`d_max` must be a finite number >= 0"):
        create_norm("batchrenorm", 8, d_max=float("nan"))
    with pytest.raises(ValueError, match="`groups` must divide num_features"):
        create_norm("evonorm_s0", 8, groups=3)
    with pytest.raises(ValueError, match="frn takes parameters"):
        create_norm("frn", 8, groups=2)


def test_wrong_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"expects 4 channels \(channels_first\)"):
        FilterResponseNorm(4)(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"rank >= 3"):
        FilterResponseNorm(4)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchRenorm(4)(torch.zeros(1, 4))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_a_trained_batch_renorm_folds_into_its_feeder(layout):
    from autonorm import find_slots, fold_norms

    torch.manual_seed(0)
    if layout == "channels_first":
        feeder, x = torch.nn.Conv2d(3, 8, 3), torch.randn(4, 3, 6, 6)
    else:
        feeder, x = torch.nn.Linear(3, 8), torch.randn(4, 5, 3)
    norm = BatchRenorm(8, r_max=2.0, d_max=1.0, warmup_steps=1, ramp_steps=2, layout=layout)
    model = torch.nn.Sequential(feeder, norm, torch.nn.ReLU())
    for step in range(5):  # through the warm-up and ramp: the corrections act
        model(x * (step + 1) + step)
    assert norm.limits() == (2.0, 1.0)
    model.eval()
    with torch.no_grad():
        before = model(x)
    (slot,) = find_slots(model, x)
    assert slot.kind == "batchrenorm"
    fold_norms(model, x)
    assert isinstance(model[1], torch.nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_batch_renorm_plain_path_computes_what_the_fused_one_does(layout):
    """The plain ops torch.compile/export trace against the fused function, past the ramp."""
    import copy

    from tests.norms.test_traced_paths import Traced

    fused = BatchRenorm(4, r_max=1.5, d_max=0.3, warmup_steps=0, ramp_steps=1, layout=layout)
    fused = fused.double()
    _randomize(fused)
    fused.num_batches_tracked.fill_(1)
    fused.running_mean.copy_(torch.randn(4, dtype=torch.double))
    fused.running_var.copy_(torch.rand(4, dtype=torch.double) + 0.2)
    plain = copy.deepcopy(fused)
    shape = (5, 4, 3, 2) if layout == "channels_first" else (5, 3, 2, 4)
    x = torch.randn(shape, dtype=torch.double) * 2 + 1
    results = []
    for layer, traced in ((fused, False), (plain, True)):
        leaf = x.clone().requires_grad_()
        out = layer(leaf.as_subclass(Traced) if traced else leaf)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
        grads = [leaf.grad, layer.weight.grad, layer.bias.grad]
        results.append((out.as_subclass(torch.Tensor).detach(), grads, layer.running_var.clone()))
    (out_f, grads_f, var_f), (out_p, grads_p, var_p) = results
    assert torch.allclose(out_f, out_p, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads_f, grads_p, strict=True))
    assert torch.allclose(var_f, var_p, atol=1e-12)
    assert int(fused.num_batches_tracked) == int(plain.num_batches_tracked) == 2
