"""SwitchableNorm against the paper's formulas, torch's native layers and a 2-process run."""

from __future__ import annotations

import gc
import re
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call

from autonorm.norms import CHANNELS_FIRST, CHANNELS_LAST, SwitchableNorm
from tests.ports import run_on_ranks

C = 5
PARAMS = ("weight", "bias", "mean_weight", "var_weight")


# -- the paper's formulas, written out directly ------------------------------------------------


def _moments(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).square().mean(dims, keepdim=True)  # biased, as in the paper


def reference_sn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean_logits: torch.Tensor,
    var_logits: torch.Tensor,
    *,
    layout: str,
    candidates: tuple[str, ...],
    eps: float = 1e-5,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Luo et al. eq. (3)-(5): softmax-weighted means and variances of each candidate.

    ``running``: use these (mean, var) for the batch candidate instead of batch moments (eval).
    """
    if layout == CHANNELS_FIRST:
        h = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, S)
        dims = {"instance": (2,), "layer": (1, 2), "batch": (0, 2)}
        stat_shape = (1, -1, 1)
    else:
        h = x.reshape(-1, x.shape[-1])  # (M, C)
        dims = {"layer": (1,), "batch": (0,)}
        stat_shape = (1, -1)
    stats = {}
    for name in candidates:
        if name == "rms":
            stats[name] = (torch.zeros(()), h.square().mean(1, keepdim=True))
        elif name == "batch" and running is not None:
            stats[name] = (running[0].view(stat_shape), running[1].view(stat_shape))
        else:
            stats[name] = _moments(h, dims[name])
    mean_w = torch.softmax(mean_logits, 0)
    var_w = torch.softmax(var_logits, 0)
    mean = sum(mean_w[k] * stats[name][0] for k, name in enumerate(candidates))
    var = sum(var_w[k] * stats[name][1] for k, name in enumerate(candidates))
    out = (h - mean) / torch.sqrt(var + eps) * weight.view(stat_shape) + bias.view(stat_shape)
    return out.reshape(x.shape)


def _random_sn(layout=CHANNELS_FIRST, candidates=None, dtype=torch.float64, seed=0, **kw):
    sn = SwitchableNorm(C, layout=layout, candidates=candidates, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return sn


def _x(shape, dtype=torch.float64, seed=0):
    """Random input whose per-sample, per-channel and per-token statistics differ (offsets along
    the first, second and last dims), so that each candidate's moments matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.rand(shape, generator=gen, dtype=torch.float64).add(0.5) + 1.0
    for dim in sorted({0, 1, len(shape) - 1}):
        offset_shape = [1] * len(shape)
        offset_shape[dim] = shape[dim]
        x = x + torch.randn(offset_shape, generator=gen, dtype=torch.float64)
    return x.to(dtype)


def _reference_of(sn: SwitchableNorm, x: torch.Tensor, **kw) -> torch.Tensor:
    return reference_sn(
        x,
        sn.weight,
        sn.bias,
        sn.mean_weight,
        sn.var_weight,
        layout=sn.layout,
        candidates=sn.candidates,
        eps=sn.eps,
        **kw,
    )


def _grads(sn: SwitchableNorm, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    sn.zero_grad()
    out = forward(x)
    gen = torch.Generator().manual_seed(123)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    grads = {name: getattr(sn, name).grad.clone() for name in PARAMS}
    grads["input"] = x.grad
    grads["output"] = out.detach()
    return grads


CASES = [
    pytest.param(CHANNELS_FIRST, None, (4, C, 3, 3), id="cf-default"),
    pytest.param(CHANNELS_FIRST, ("instance", "batch"), (3, C, 4, 2), id="cf-in-bn"),
    pytest.param(CHANNELS_FIRST, ("layer",), (3, C, 6), id="cf-ln-only"),
    pytest.param(CHANNELS_FIRST, ("batch", "layer", "instance"), (2, C, 2, 2, 2), id="cf-3d-order"),
    pytest.param(CHANNELS_FIRST, None, (6, C), id="cf-no-positions"),
    pytest.param(CHANNELS_LAST, None, (3, 4, C), id="cl-default"),
    pytest.param(CHANNELS_LAST, ("batch", "rms"), (2, 3, 2, C), id="cl-bn-rms"),
    pytest.param(CHANNELS_LAST, ("layer",), (7, C), id="cl-ln-only"),
]


@pytest.mark.parametrize(("layout", "candidates", "shape"), CASES)
def test_forward_and_gradients_match_the_paper(layout, candidates, shape):
    sn = _random_sn(layout, candidates)
    x = _x(shape)
    got = _grads(sn, x, sn)
    expected = _grads(sn, x, lambda x: _reference_of(sn, x))
    for key in ("output", "input", *PARAMS):
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.parametrize(
    ("layout", "shape"), [(CHANNELS_FIRST, (3, C, 4)), (CHANNELS_LAST, (3, 4, C))]
)
def test_affine_false_matches_the_paper_with_unit_scale(layout, shape):
    sn = _random_sn(layout, affine=False)
    assert sn.weight is None and sn.bias is None
    x = _x(shape).requires_grad_()
    out = sn(x)
    ones, zeros = torch.ones(C, dtype=x.dtype), torch.zeros(C, dtype=x.dtype)
    expected = reference_sn(
        x, ones, zeros, sn.mean_weight, sn.var_weight, layout=layout, candidates=sn.candidates
    )
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, sn.mean_weight, sn.var_weight))
    expected_grads = torch.autograd.grad(
        expected.square().sum(), (x, sn.mean_weight, sn.var_weight)
    )
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("layout", "make"),
    [
        pytest.param(
            CHANNELS_FIRST,
            lambda x: x.contiguous(memory_format=torch.channels_last),
            id="cf-channels_last-memory",
        ),
        pytest.param(CHANNELS_FIRST, lambda x: torch.cat([x, x], 1)[:, C:], id="cf-channel-slice"),
        pytest.param(
            CHANNELS_FIRST,
            lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
            id="cf-transposed",
        ),
        pytest.param(
            CHANNELS_LAST, lambda x: torch.cat([x, x], -1)[..., C:], id="cl-channel-slice"
        ),
        pytest.param(
            CHANNELS_LAST,
            lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
            id="cl-transposed",
        ),
    ],
)
def test_non_contiguous_inputs_match_contiguous(layout, make):
    sn = _random_sn(layout)
    x = _x((3, C, 4, 5) if layout == CHANNELS_FIRST else (3, 4, C))
    expected = _grads(sn, x, sn)
    got = _grads(sn, x, lambda x: sn(make(x)))
    for key in ("output", "input", *PARAMS):
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.parametrize(
    ("layout", "shape"), [(CHANNELS_FIRST, (3, C, 4)), (CHANNELS_LAST, (3, 4, C))]
)
def test_input_is_held_for_the_backward_only_through_saved_tensors(layout, shape):
    """Pack hooks (e.g. ``save_on_cpu``, offloading) see every tensor the backward keeps."""
    sn = _random_sn(layout)
    x = _x(shape).requires_grad_()
    h = x * 1.0
    ref = weakref.ref(h)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        out = sn(h)
    del h
    gc.collect()
    assert ref() is None
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("layout", "shape"), [(CHANNELS_FIRST, (4, C, 8, 8)), (CHANNELS_LAST, (4, 16, C))]
)
def test_float32_statistics_survive_a_large_offset(layout, shape):
    sn = _random_sn(layout)
    x = _x(shape) * 0.1 + 1000.0  # mean 1e4 times the std: one-pass moments would fail
    expected = _reference_of(sn, x)
    sn32 = _random_sn(layout, dtype=torch.float32)
    got = sn32(x.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize(("layout", "candidates", "shape"), CASES)
def test_eval_uses_running_statistics_per_sample(layout, candidates, shape):
    sn = _random_sn(layout, candidates)
    for seed in range(3):
        sn(_x(shape, seed=seed))
    sn.eval()
    x = _x(shape, seed=9)
    running = None if sn.running_mean is None else (sn.running_mean, sn.running_var)
    got = _grads(sn, x, sn)
    expected = _grads(sn, x, lambda x: _reference_of(sn, x, running=running))
    for key in ("output", "input", *PARAMS):
        torch.testing.assert_close(got[key], expected[key], msg=key)
    with torch.no_grad():
        torch.testing.assert_close(sn(x[:1]), got["output"][:1])
        x_other = x.clone()
        x_other[1:] = _x(x[1:].shape, seed=10)
        torch.testing.assert_close(sn(x_other)[:1], got["output"][:1])


@pytest.mark.parametrize(
    ("candidate", "native"),
    [
        ("instance", lambda: nn.InstanceNorm2d(C, affine=True)),
        ("layer", lambda: nn.GroupNorm(1, C)),
        ("batch", lambda: nn.BatchNorm2d(C)),
    ],
)
@pytest.mark.parametrize("how", ["-inf", "gap50"])
def test_one_hot_logits_equal_native_layers(candidate, native, how):
    sn = _random_sn(dtype=torch.float32)
    one_hot = torch.full((3,), float("-inf") if how == "-inf" else -50.0)
    one_hot[sn.candidates.index(candidate)] = 0.0
    with torch.no_grad():
        sn.mean_weight.copy_(one_hot)
        sn.var_weight.copy_(one_hot)
    layer = native()
    with torch.no_grad():
        layer.weight.copy_(sn.weight)
        layer.bias.copy_(sn.bias)
    x = _x((4, C, 5, 3), dtype=torch.float32)
    got = _grads(sn, x, sn)
    x_native = x.clone().requires_grad_()
    out = layer(x_native)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(123)))
    torch.testing.assert_close(got["output"], out.detach())
    torch.testing.assert_close(got["input"], x_native.grad)
    torch.testing.assert_close(got["weight"], layer.weight.grad)
    torch.testing.assert_close(got["bias"], layer.bias.grad)


@pytest.mark.parametrize("candidates", [("batch",), None])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_statistics_follow_batchnorm(candidates, momentum):
    sn = SwitchableNorm(C, candidates=candidates, momentum=momentum)
    bn = nn.BatchNorm2d(C, momentum=momentum)
    for seed in range(4):
        x = _x((3, C, 4, 2), dtype=torch.float32, seed=seed)
        out = sn(x)
        expected = bn(x)
        if candidates == ("batch",):
            torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sn.running_mean, bn.running_mean)
    torch.testing.assert_close(sn.running_var, bn.running_var)
    assert sn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4
    if candidates == ("batch",):
        sn.eval()
        bn.eval()
        x = _x((3, C, 4, 2), dtype=torch.float32, seed=11)
        torch.testing.assert_close(sn(x), bn(x))


def test_channels_last_running_statistics_follow_batchnorm_over_tokens():
    sn = SwitchableNorm(C, layout=CHANNELS_LAST)
    bn = nn.BatchNorm1d(C)
    for seed in range(3):
        x = _x((2, 6, C), dtype=torch.float32, seed=seed)
        sn(x)
        bn(x.reshape(-1, C))
    torch.testing.assert_close(sn.running_mean, bn.running_mean)
    torch.testing.assert_close(sn.running_var, bn.running_var)


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
def test_without_running_statistics_eval_uses_the_batch_as_batchnorm_does(layout):
    sn = SwitchableNorm(C, layout=layout, candidates=("batch",), track_running_stats=False)
    sn = sn.double()
    assert sn.running_mean is None and "running_mean" not in sn.state_dict()
    shape = (4, C, 3, 3) if layout == CHANNELS_FIRST else (4, 6, C)
    x = _x(shape, dtype=torch.float64) * 3 + 2
    bn = nn.BatchNorm2d(C, track_running_stats=False).double().eval()
    flat = x if layout == CHANNELS_FIRST else x.reshape(-1, C, 1, 1)
    expected = bn(flat).reshape(shape)
    torch.testing.assert_close(sn.eval()(x), expected)
    torch.testing.assert_close(sn.train()(x), expected)
    assert "track_running_stats=False" in repr(sn)


def test_no_batch_candidate_has_no_running_statistics():
    sn = SwitchableNorm(C, candidates=("instance", "layer"))
    assert sn.running_mean is None and "running_mean" not in sn.state_dict()
    x = _x((2, C, 3), dtype=torch.float32)
    torch.testing.assert_close(sn(x), sn.eval()(x))


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
def test_one_by_one_maps_are_finite(layout):
    sn = _random_sn(layout, dtype=torch.float32)
    shape = (4, C, 1, 1) if layout == CHANNELS_FIRST else (4, 1, 1, C)
    x = _x(shape, dtype=torch.float32).requires_grad_()
    out = sn(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in sn.parameters())
    sn.eval()
    assert torch.isfinite(sn(x)).all()


@pytest.mark.parametrize(
    ("layout", "shape"), [(CHANNELS_FIRST, (1, C, 3, 3)), (CHANNELS_LAST, (1, C))]
)
def test_training_batch_of_one_warns_and_drops_the_batch_branch(layout, shape):
    sn = _random_sn(layout, dtype=torch.float32)
    x = _x(shape, dtype=torch.float32).requires_grad_()
    message = (
        "SwitchableNorm got a training batch of one sample: its batch statistics are undefined, "
        "so the batch branch is left out of this step and the running statistics are not "
        "updated. Train with batches of 2 or more samples."
    )
    with pytest.warns(RuntimeWarning, match=f"^{re.escape(message)}$"):
        out = sn(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in sn.parameters())
    assert sn.num_batches_tracked.item() == 0
    torch.testing.assert_close(sn.running_mean, torch.zeros(C))
    torch.testing.assert_close(sn.running_var, torch.ones(C))
    # the batch branch gets weight 0: the rest is renormalized among the other candidates
    kept = tuple(c for c in sn.candidates if c != "batch")
    keep = [sn.candidates.index(c) for c in kept]
    expected = reference_sn(
        x.detach(),
        sn.weight,
        sn.bias,
        sn.mean_weight[keep],
        sn.var_weight[keep],
        layout=layout,
        candidates=kept,
    )
    torch.testing.assert_close(out.detach(), expected.detach())
    # eval mode with one sample is fine: running statistics are defined
    sn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(sn(x)).all()


def test_batch_only_with_one_sample_is_an_error():
    sn = SwitchableNorm(C, candidates=("batch",))
    with pytest.raises(ValueError) as err:
        sn(torch.randn(1, C, 3, 3))
    assert str(err.value) == (
        "SwitchableNorm with candidates=('batch',) needs more than one sample per batch in "
        "training (got a batch of 1)"
    )


def test_the_repr_shows_what_differs_from_plain_softmax_mixing():
    assert repr(SwitchableNorm(4)) == (
        "SwitchableNorm(4, layout='channels_first', candidates=('instance', 'layer', 'batch'), "
        "eps=1e-05, momentum=0.1, affine=True)"
    )
    sparse = SwitchableNorm(4, track_running_stats=False, mixing="sparsestmax")
    sparse.radius.fill_(0.25)
    assert repr(sparse) == (
        "SwitchableNorm(4, layout='channels_first', candidates=('instance', 'layer', 'batch'), "
        "eps=1e-05, momentum=0.1, affine=True, track_running_stats=False, "
        "mixing='sparsestmax', radius=0.25)"
    )


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="`candidates` must be distinct names"):
        SwitchableNorm(C, candidates=("rms",))
    with pytest.raises(ValueError, match="`candidates` must be distinct names"):
        SwitchableNorm(C, candidates=("batch", "batch"))
    with pytest.raises(ValueError, match="`eps` must be > 0"):
        SwitchableNorm(C, eps=0.0)
    with pytest.raises(ValueError, match=r"expects an input \(N, C, \*\) with C=5"):
        SwitchableNorm(C)(torch.randn(2, 4, 3))


def test_autocast_bf16_on_cpu_keeps_float32_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3, padding=1)
    sn = SwitchableNorm(C)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        out = sn(h)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in sn.parameters())
    assert sn.running_mean.dtype == sn.running_var.dtype == torch.float32
    assert torch.isfinite(sn.running_var).all()
    # close to the float32 layer on the same bf16 values
    expected = SwitchableNorm(C)(h.detach().float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("layout", "shape", "training"),
    [
        (CHANNELS_FIRST, (3, C, 2, 2), True),
        (CHANNELS_FIRST, (2, C, 3), False),
        (CHANNELS_LAST, (2, 3, C), True),
        (CHANNELS_LAST, (3, C), False),
    ],
)
def test_gradcheck(layout, shape, training):
    sn = _random_sn(layout)
    sn.train(training)
    x = _x(shape).requires_grad_()
    params = [getattr(sn, name).detach().clone().requires_grad_() for name in PARAMS]

    def fn(x, *params):
        return functional_call(sn, dict(zip(PARAMS, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


# -- two processes: batch statistics and gradients equal one process on the whole batch ---------

WORLD = 2
DIST_CASES = {
    CHANNELS_FIRST: (6, C, 3, 2),  # 3 samples per process
    CHANNELS_LAST: (4, 3, C),
}


def _dist_run(sn: SwitchableNorm, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = sn(x)
    out.backward(grad)
    result = {name: getattr(sn, name).grad for name in PARAMS}
    result.update(output=out.detach(), input=x.grad)
    result.update(running_mean=sn.running_mean.clone(), running_var=sn.running_var.clone())
    return result


def _rank_results(rank: int) -> dict:
    results = {}
    for layout, shape in DIST_CASES.items():
        sn = _random_sn(layout)
        x, grad = _x(shape), _x(shape, seed=1)
        results[layout] = _dist_run(sn, x.chunk(WORLD)[rank], grad.chunk(WORLD)[rank])
    return results


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = run_on_ranks(_rank_results, WORLD, tmp_path)
    for layout, shape in DIST_CASES.items():
        single = _dist_run(_random_sn(layout), _x(shape), _x(shape, seed=1))
        parts = [r[layout] for r in ranks]
        for key in ("output", "input"):
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), single[key], msg=key)
        for key in PARAMS:  # data parallel sums (or averages) the ranks' parameter gradients
            torch.testing.assert_close(sum(p[key] for p in parts), single[key], msg=key)
        for key in ("running_mean", "running_var"):
            for part in parts:
                torch.testing.assert_close(part[key], single[key], msg=key)
