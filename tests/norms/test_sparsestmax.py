"""SparsestMax against its definition (a brute-force projection), and Sparse SwitchableNorm."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from autonorm.norms import SwitchableNorm, create_norm, sparsestmax, vertex_radius


def brute_force(z: torch.Tensor, r: float, allowed: list[bool] | None = None) -> torch.Tensor:
    """A projection of ``z`` onto ``{p in simplex, p_i = 0 where not allowed, ||p - u|| >= r}``
    by enumerating every face: in the relative interior of a face the optimum is either the
    projection onto the face's plane or the point of the sphere in that plane nearest to it
    (any point of that sphere, where the projection onto the plane is its centre)."""
    z = z.double()
    k = len(z)
    u = torch.full((k,), 1.0 / k, dtype=torch.float64)
    indices = [i for i in range(k) if allowed is None or allowed[i]]
    best, best_dist = None, math.inf
    for size in range(1, len(indices) + 1):
        for face in itertools.combinations(indices, size):
            face = list(face)
            centre = torch.zeros(k, dtype=torch.float64)
            centre[face] = 1.0 / size
            plane = centre.clone()
            plane[face] += z[face] - z[face].mean()
            points = [plane]
            face_r2 = r * r + 1.0 / k - 1.0 / size
            away = plane - centre
            if away.norm() == 0:  # tied logits: every point of the sphere there is as near
                away = -centre
                away[face[0]] += 1
            if face_r2 >= 0 and away.norm() > 0:
                points.append(centre + math.sqrt(face_r2) * away / away.norm())
            for p in points:
                if (p >= -1e-12).all() and (p - u).norm() >= r - 1e-9:
                    diff = p - z
                    dist = (diff - diff.mean()).norm()  # distance within the simplex's plane
                    if dist < best_dist - 1e-12:
                        best, best_dist = p, dist
    assert best is not None
    return best


def sparsemax_by_bisection(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax from its threshold form, the threshold found by bisection."""
    lo, hi = float(z.min()) - 1, float(z.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (z - mid).clamp_min(0).sum() > 1 else (lo, mid)
    return (z - (lo + hi) / 2).clamp_min(0)


def distance(p: torch.Tensor, z: torch.Tensor) -> float:
    diff = p.double() - z.double()
    return float((diff - diff.mean()).norm())


def test_matches_a_brute_force_projection_on_random_small_k():
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        k = int(torch.randint(2, 6, (1,), generator=g))
        scale = float(torch.rand(1, generator=g)) * 4
        z = torch.randn(k, generator=g, dtype=torch.float64) * scale
        r = float(torch.rand(1, generator=g)) * vertex_radius(k)
        allowed = None
        if trial % 3 == 0:
            allowed = (torch.rand(k, generator=g) > 0.3).tolist()
            allowed[int(torch.randint(0, k, (1,), generator=g))] = True
        p = sparsestmax(z, r, None if allowed is None else torch.tensor(allowed))
        torch.testing.assert_close(p, brute_force(z, r, allowed), rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_on_the_simplex_and_at_least_radius_from_the_centre(k):
    z = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    for fraction in (0.0, 0.1, 0.4, 0.7, 0.95, 1.0):
        r = fraction * vertex_radius(k)
        p = sparsestmax(z, r)
        assert p.shape == z.shape
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(64))
        assert ((p - 1.0 / k).norm(dim=-1) >= r - 1e-5).all()


def test_radius_zero_is_sparsemax():
    z = torch.randn(32, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    expected = torch.stack([sparsemax_by_bisection(row) for row in z])
    torch.testing.assert_close(sparsestmax(z, 0.0), expected, rtol=0, atol=1e-9)
    assert (sparsestmax(z, 0.0) == 0).any()  # sparse, unlike softmax


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_vertex_radius_gives_exactly_one_hot_at_the_largest_logit(k):
    z = torch.randn(50, k, generator=torch.Generator().manual_seed(k))
    expected = torch.nn.functional.one_hot(z.argmax(-1), k).float()
    assert torch.equal(sparsestmax(z, vertex_radius(k)), expected)
    # the radius as a buffer would hold it, in float32 and float16
    for dtype in (torch.float32, torch.float16):
        radius = torch.tensor(vertex_radius(k), dtype=dtype)
        assert torch.equal(sparsestmax(z, radius), expected)
    assert torch.equal(sparsestmax(z, 5.0), expected)  # beyond the vertex: still the vertex


def test_ties_go_to_the_earlier_candidate_and_stay_projections():
    r = 0.6  # beyond the uniform mix of the two tied logits (0.5 from the centre)
    z = torch.tensor([1.0, 3.0, 3.0, 0.0])
    p = sparsestmax(z, r)
    assert p[1] > p[2] >= 0 and p[0] == 0 and p[3] == 0
    assert distance(p, z) == pytest.approx(distance(brute_force(z, r), z), abs=1e-6)
    assert torch.equal(sparsestmax(torch.ones(3), vertex_radius(3)), torch.tensor([1.0, 0, 0]))
    assert torch.equal(sparsestmax(torch.tensor([0.0, 2, 2]), 1.0), torch.tensor([0.0, 1, 0]))
    assert torch.equal(sparsestmax(z, r), p)  # deterministic
    # tied logits still get a gradient (sparsemax's), so they can move apart
    tied = torch.ones(3, requires_grad=True)
    (sparsestmax(tied, 0.5) * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert tied.grad is not None and tied.grad[2] > 0 > tied.grad[0]
    # equal logits inside the radius: the uniform mix, no tie to break
    torch.testing.assert_close(sparsestmax(torch.ones(4), 0.0), torch.full((4,), 0.25))


def test_masked_candidates_get_zero_and_the_rest_is_projected_over_their_face():
    z = torch.tensor([[0.2, 5.0, 0.1], [1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    for r in (0.0, 0.3, 0.6, vertex_radius(3)):
        p = sparsestmax(z, r, mask)
        assert (p[:, 1] == 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))
        for row in range(2):
            torch.testing.assert_close(p[row], brute_force(z[row], r, mask.tolist()))
    assert torch.equal(
        sparsestmax(z, vertex_radius(3), mask)[1], torch.tensor([0.0, 0, 1]).double()
    )
    with pytest.raises(ValueError, match="`mask` must allow"):
        sparsestmax(z, 0.1, torch.tensor([False, False, False]))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.9])
def test_gradcheck_float64(fraction):
    g = torch.Generator().manual_seed(3)
    for k in (3, 5):
        z = (torch.randn(4, k, generator=g, dtype=torch.float64) * 2).requires_grad_()
        r = fraction * vertex_radius(k)
        assert torch.autograd.gradcheck(lambda x, r=r: sparsestmax(x, r), (z,))
    mask = torch.tensor([True, True, False, True])
    z = torch.tensor([[0.3, -0.2, 1.0, 0.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sparsestmax(x, 0.3, mask), (z,))


def test_bad_radius_and_logits():
    with pytest.raises(ValueError, match="`radius` must be a finite number >= 0"):
        sparsestmax(torch.zeros(3), -0.1)
    with pytest.raises(ValueError, match="non-empty last dim"):
        sparsestmax(torch.zeros(0), 0.1)


# -- Sparse SwitchableNorm ---------------------------------------------------------------------


def test_sparse_switchable_norm_mixes_mean_and_variance_with_one_set_of_sparse_weights():
    sn = SwitchableNorm(6, mixing="sparsestmax")
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([2.0, 0.5, 0.0]))  # var_weight stays at ones
    weights = sn.mixing_weights()  # sparsemax of the average logits (1.5, 0.75, 0.5)
    assert weights["mean"] == pytest.approx({"instance": 0.875, "layer": 0.125, "batch": 0.0})
    assert weights["var"] == weights["mean"]
    sn.radius.fill_(0.3)
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    sn(x).square().mean().backward()
    for logits in (sn.mean_weight, sn.var_weight):  # both train, with the same gradient
        assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(sn.mean_weight.grad, sn.var_weight.grad)
    assert "mixing='sparsestmax'" in repr(sn)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_one_hot_sparse_sn_is_the_chosen_normalizer(layout):
    """At the vertex radius the layer is exactly one candidate: here batch statistics."""
    sn = SwitchableNorm(6, layout=layout, mixing="sparsestmax", affine=False)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.0, 0.1, 0.3]))
        sn.var_weight.copy_(torch.tensor([0.2, 0.0, 0.25]))
    sn.radius.fill_(sn.vertex_radius)
    x = torch.randn(8, 6, 4, 4) if layout == "channels_first" else torch.randn(8, 5, 6)
    reference = create_norm("batchnorm", 6, layout=layout, affine=False, input_ndim=x.dim())
    torch.testing.assert_close(sn(x), reference(x), rtol=1e-4, atol=1e-5)
    assert sn.mixing_weights()["mean"]["batch"] == 1.0


def test_batch_of_one_masks_the_batch_branch():
    sn = SwitchableNorm(4, mixing="sparsestmax")
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.0, 0.0, 9.0]))
    with pytest.warns(RuntimeWarning, match="batch of one"):
        out = sn(torch.randn(1, 4, 3, 3))
    assert torch.isfinite(out).all()


def test_state_dict_round_trip_keeps_the_radius():
    sn = SwitchableNorm(5, mixing="sparsestmax", radius=0.2)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.4, 0.1, -0.3]))
    sn.radius.fill_(0.6)
    state = sn.state_dict()
    assert "radius" in state
    loaded = SwitchableNorm(5, mixing="sparsestmax")
    loaded.load_state_dict(state)
    assert float(loaded.radius) == pytest.approx(0.6)
    assert loaded.mixing_weights() == sn.mixing_weights()
    # a softmax SN's state dict has no radius, so the two do not load into each other silently
    assert "radius" not in SwitchableNorm(5).state_dict()
    with pytest.raises(RuntimeError, match="radius"):
        SwitchableNorm(5).load_state_dict(state)


def test_registry_builds_sparse_sn_and_bad_mixing_is_refused():
    sn = create_norm("switchable", 8, mixing="sparsestmax")
    assert isinstance(sn, SwitchableNorm) and sn.mixing == "sparsestmax"
    with pytest.raises(ValueError, match="`mixing` must be one of"):
        SwitchableNorm(8, mixing="sparsemax")
    with pytest.raises(ValueError, match="`radius` applies to mixing='sparsestmax'"):
        SwitchableNorm(8, radius=0.3)
    with pytest.raises(ValueError, match="`radius` must be a finite number"):
        SwitchableNorm(8, mixing="sparsestmax", radius=-1.0)
