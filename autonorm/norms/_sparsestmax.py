"""SparsestMax: a projection onto the simplex that keeps away from its centre.

Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax", CVPR 2019.
``sparsestmax(z, r)`` is the Euclidean projection of the logits ``z`` onto
``{p in simplex : ||p - u|| >= r}``, ``u = 1/K`` the simplex centre. ``r = 0`` is sparsemax
(Martins & Astudillo, 2016); ``r = sqrt((K - 1) / K)`` (:func:`vertex_radius`) leaves only the
vertices, so the output is one-hot.

Every solution lies on the curve ``p(theta) = relu(z - theta) / sum(relu(z - theta))``, whose
squared norm grows with ``theta`` (from ``1/K`` towards 1). Sparsemax is the point where the sum
before normalizing is 1; when it is at least ``r`` from the centre it is the answer. Otherwise the
answer is the curve's point on the sphere ``||p||^2 = r^2 + 1/K``: with support ``S`` (the top
``m`` logits) it is ``1/m + sqrt(r^2 + 1/K - 1/m) * d / ||d||`` where ``d = z_S - mean(z_S)``, the
point of the sphere's circle in the face of ``S`` that lies toward the logits.

The support is chosen in float64 without autograd; the output is then a closed form of the logits
on that support (in float64 too), so autograd gives the derivative of the projection. Where the top logits tie and
the radius asks for more than their uniform mix, every point of the sphere in their face is a
projection: the one taken favours the earlier candidate (the limit of the logits minus a vanishing
multiple of the index). The projection jumps there; its gradient is taken as sparsemax's over the
tied candidates, so that equal logits (a fresh layer's) still move apart.
"""

from __future__ import annotations

import math

import torch

#: Squared norms within this of 1 are the vertex (float rounding of ``vertex_radius``).
_VERTEX_TOL = 1e-9


def vertex_radius(k: int) -> float:
    """The distance from the centre of the ``k``-candidate simplex to a vertex:
    ``sqrt((k - 1) / k)``; a radius this large makes :func:`sparsestmax` one-hot."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    return math.sqrt((k - 1) / k)


def _target(radius: float | torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    """``r^2 + 1/K`` clamped to 1, in float64: the squared norm the projection must reach.

    A radius at least the vertex radius (as represented in the radius tensor's own dtype, so
    that a radius set to the vertex radius in float16 still means the vertex) gives 1.
    """
    vertex = vertex_radius(k)
    if not isinstance(radius, torch.Tensor):
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"`radius` must be a finite number >= 0, got {radius!r}")
        radius = torch.tensor(float(radius), dtype=torch.float64)
    if radius.numel() != 1:
        raise ValueError(f"`radius` must be a scalar, got shape {tuple(radius.shape)}")
    radius = radius.reshape(())
    at_vertex = radius.to(device) >= torch.tensor(vertex, dtype=radius.dtype, device=device)
    r = radius.to(device, torch.float64).clamp_min(0)
    target = (r * r + 1.0 / k).clamp_max(1.0)
    return torch.where(at_vertex | (target >= 1 - _VERTEX_TOL), 1.0, target)


def _select(
    z: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor, sphere: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The support of the projection of float64 logits ``z`` over the ``allowed`` candidates
    (where ``sphere``, bool ``(..., 1)``: of the curve's point on the sphere, even where
    sparsemax lies outside it).

    Returns:
        ``support`` (bool, like ``z``), ``on_sphere`` (bool ``(..., 1)``: the sphere's point,
        not sparsemax) and ``tied`` (bool ``(..., 1)``: the support is a tie of the top logits
        and the sphere lies beyond their uniform mix, so the direction is the tie-break's).
    """
    k = z.shape[-1]
    ks = torch.arange(1, k + 1, dtype=z.dtype, device=z.device)
    n = allowed.sum(-1, keepdim=True)
    sorted_z, order = torch.sort(
        torch.where(allowed, z, -math.inf), dim=-1, descending=True, stable=True
    )
    valid = ks <= n
    filled = torch.where(valid, sorted_z, sorted_z[..., :1])  # finite stand-ins past n
    cumsum = filled.cumsum(-1)
    # sparsemax: the top m0 logits, threshold tau
    # at least 1: non-finite logits (a diverged run) give NaN weights, which derive_config
    # refuses by name, instead of an index error here
    m0 = (valid & (1 + ks * filled > cumsum)).sum(-1, keepdim=True).clamp_min(1)
    tau = (cumsum.gather(-1, m0 - 1) - 1) / m0
    p0 = torch.where(allowed, (z - tau).clamp_min(0), 0.0)
    on_sphere = ((p0 * p0).sum(-1, keepdim=True) < target) | sphere
    # the sphere: g[j] = ||p(theta)||^2 at theta = the (j+2)-th largest logit, where the top
    # j+1 are in the support; g falls with j, the support is where it first reaches the target
    theta = torch.cat([filled[..., 1:], filled[..., :1]], -1)
    gaps = (filled.unsqueeze(-2) - theta.unsqueeze(-1)).clamp_min(0) * valid.unsqueeze(-2)
    s1, s2 = gaps.sum(-1), (gaps * gaps).sum(-1)
    g = torch.where(s1 > 0, s2 / torch.where(s1 > 0, s1 * s1, 1.0), math.inf)
    g = torch.where(ks < n, g, torch.where(ks == n, 1.0 / n, math.inf))
    m1 = torch.minimum(n + 1 - (g <= target).sum(-1, keepdim=True), n)
    m = torch.where(on_sphere, m1, m0).clamp_min(1)
    support = torch.zeros_like(allowed).scatter(-1, order, ks <= m)
    tied = on_sphere & (sorted_z[..., :1] == sorted_z.gather(-1, m - 1)) & (target * m > 1)
    return support, on_sphere, tied


def _weights(
    logits: torch.Tensor, support: torch.Tensor, on_sphere: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection as a closed form of the logits on a known support (differentiable), and
    sparsemax's form on that support."""
    m = support.sum(-1, keepdim=True).to(logits.dtype)
    mean = torch.where(support, logits, 0.0).sum(-1, keepdim=True) / m
    d = torch.where(support, logits - mean, 0.0)
    sparse = d + 1 / m
    norm2 = (d * d).sum(-1, keepdim=True)
    spread2 = (target - 1 / m).clamp_min(0)  # squared radius in the face
    moved = norm2 > 0
    # sqrt(spread2) apart: a zero spread2 has no slope, but sqrt(0 / norm2) has a nan one
    scale = torch.where(moved, spread2.sqrt() * torch.where(moved, norm2, 1.0).rsqrt(), 0.0)
    sphere = 1 / m + d * scale
    weights = torch.where(support, torch.where(on_sphere, sphere, sparse), 0.0).clamp_min(0)
    return weights, torch.where(support, sparse, 0.0)


def sparsestmax(
    logits: torch.Tensor, radius: float | torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Project ``logits`` onto the simplex, at least ``radius`` from its centre (last dim).

    Args:
        logits: ``(..., K)``.
        radius: a number or a scalar tensor, ``>= 0``; 0 is sparsemax, :func:`vertex_radius`
            of K (or more) is one-hot. A negative tensor radius counts as 0.
        mask: optional bool ``(..., K)`` (broadcastable) of the candidates that may take
            weight; the others get 0 and the projection is taken over the face of the allowed
            ones, with the same constraint (distance from the centre of all K candidates).

    Returns:
        Weights like ``logits``: non-negative, summing to 1 over the last dim. Ties go to the
        earlier candidate.

    Raises:
        ValueError: an empty last dim, a mask that allows nothing in some row, a bad radius.

    Example::

        >>> z = torch.tensor([1.0, 0.8, -1.0])
        >>> sparsestmax(z, 0.0)
        tensor([0.6000, 0.4000, 0.0000])
        >>> sparsestmax(z, vertex_radius(3))
        tensor([1., 0., 0.])
    """
    k = logits.shape[-1] if logits.dim() else 0
    if k < 1:
        raise ValueError(f"`logits` must have a non-empty last dim, got {tuple(logits.shape)}")
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask.to(device=logits.device, dtype=torch.bool)
        if not bool(allowed.any(-1).all()):
            raise ValueError("`mask` must allow at least one candidate in every row")
    with torch.no_grad():
        target = _target(radius, k, logits.device)
        z = logits.detach().to(torch.float64)
        # the tie-break, solved alongside: the limit of the logits minus a vanishing multiple
        # of the index, i.e. the sphere's point of -index over the top logits (no ties there)
        index = -torch.arange(k, dtype=torch.float64, device=z.device).expand_as(z)
        top = allowed & (z == torch.where(allowed, z, -math.inf).amax(-1, keepdim=True))
        sphere = torch.tensor([[False], [True]], device=z.device)
        supports, on_spheres, ties = _select(
            torch.stack([z, index], -2), torch.stack([allowed, top], -2), target, sphere
        )
        support, tie_support = supports.unbind(-2)
        on_sphere, tie_on_sphere = on_spheres.unbind(-2)
        tied = ties[..., 0, :]  # where the top logits tie, the support is all of them
        tie_weights, _ = _weights(index, tie_support, tie_on_sphere, target)
    # in float64: near ties, d = z - mean(z) loses most of its digits in float32
    weights, slope = _weights(logits.to(torch.float64), support, on_sphere, target)
    # a tie is a jump of the projection: it takes sparsemax's slope over the tied candidates,
    # so that tied logits (equal at init) can still move apart
    tie_weights = tie_weights + (slope - slope.detach())
    return torch.where(tied, tie_weights, weights).to(logits.dtype)


__all__ = ["sparsestmax", "vertex_radius"]
