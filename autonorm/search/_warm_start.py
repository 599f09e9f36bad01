"""The first trials of a search: the model's own norms, the learned and recommended configs,
uniform SwitchableNorm and the uniform families a user would try by hand, then random configs.

A learn pass's derived config joins them (and narrows the space: see
:func:`autonorm.search_spaces.narrow_space`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from autonorm._errors import AutoNormError
from autonorm._trial_keys import DEFAULT_GUARD, OWN_NORMS_GUARD
from autonorm.budget import Budget
from autonorm.config import NormChoice, NormConfig
from autonorm.recommendation import recommend
from autonorm.search_spaces import Parameters, params_for
from autonorm.surgery import Slot

log = logging.getLogger(__name__)


#: The label of the model's own norms: the incumbent, the config a search keeps without evidence.
OWN_NORMS = "own norms"
#: The label of a config the user named as the default (``default_config``): kept as the own
#: norms are, and replaced only on evidence, the own norms included.
DEFAULT_CONFIG = "default config"
#: How strongly each guarded baseline is kept (``_trial_keys.INCUMBENT``).
GUARDS = {OWN_NORMS: OWN_NORMS_GUARD, DEFAULT_CONFIG: DEFAULT_GUARD}
#: The uniform families a user would try by hand, in the order the warm start lists them; the
#: small-batch family only where the space offers it (a per-device batch under 16).
UNIFORM_FAMILIES = (
    "batchnorm",
    "groupnorm",
    "instancenorm",
    "layernorm",
    "rmsnorm",
    "dyt",
    "batchrenorm",
    "frn",
    "evonorm_s0",
)
#: Uniform SwitchableNorm: not in the hand-run grid (so not in its compute), but screened with
#: it, because each layer learns its own mix (Luo et al., 2019): strong where batch statistics
#: fail for some layers only, and its mixing weights say which.
SWITCHABLE = "switchable"
#: Its baseline's label: the screened SwitchableNorm model is the supernet whose slots are
#: decided by perturbation (:func:`~autonorm.surgery.perturb_slots`).
SUPERNET = f"uniform:{SWITCHABLE}"


def _baseline_params(
    slots: Sequence[Slot],
    params: Parameters,
    families: Sequence[str] = UNIFORM_FAMILIES,
) -> list[tuple[str, dict[str, str]]]:
    """Warm-start trials: the model's own norms, then each uniform family of ``families``.

    A uniform family takes every parameter that offers its plain choice (GroupNorm's first
    offered group count: the slot's default); a slot where the family is not valid keeps its own
    layer when the space offers that. A family that fits no slot, or a config equal to an
    earlier one, is left out.
    """
    by_name = {s.name: s for s in slots}

    def own(labels: list[str], names: list[str]) -> str | None:
        picks = {by_name[n].keep_choice().label for n in names}
        label = picks.pop() if len(picks) == 1 else None
        return label if label in labels else None

    out: list[tuple[str, dict[str, str]]] = []
    own_params = {p: own(labels, names) for p, (labels, names) in params.items()}
    if None not in own_params.values():
        out.append((OWN_NORMS, own_params))  # type: ignore[arg-type]
    for name in families:
        chosen: dict[str, str] = {}
        fits = False
        for param, (labels, names) in params.items():
            own_kind = {by_name[n].keep_choice().name for n in names} == {name}
            # the slot's own kind is its own layer (a rewrite keeps its settings): one config
            label = own_params[param] if own_kind else None
            label = label or next((lb for lb in labels if _plain_choice(lb, name)), None)
            fits = fits or label is not None
            label = label or own_params[param]
            if label is None:
                break
            chosen[param] = label
        else:
            if fits and chosen not in [c for _, c in out]:
                out.append((f"uniform:{name}", chosen))
    return out


def default_params(config: NormConfig, slots: Sequence[Slot], params: Parameters) -> dict[str, str]:
    """The trial parameters of the user's default config, exactly: a slot it does not name
    keeps its own layer.

    Raises:
        AutoNormError: a slot it names is not searched, or its choice is not one the space
            offers there (the guard must protect the config the user named, not a neighbour).
    """
    by_name = {s.name: s for s in slots}
    unknown = sorted(set(config.choices) - set(by_name))
    if unknown:
        raise AutoNormError(f"default_config names slots the search does not choose: {unknown}")
    chosen: dict[str, str] = {}
    for param, (labels, names) in params.items():
        picks = {(config.choices.get(n) or by_name[n].keep_choice()).label for n in names}
        label = picks.pop() if len(picks) == 1 else None
        if label not in labels:
            raise AutoNormError(
                f"default_config: slot(s) {names} get {label or 'different choices'}, which the "
                f"search space does not offer there (offered: {labels})"
            )
        chosen[param] = label
    return chosen


def grid_size(slots: Sequence[Slot], params: Parameters) -> int:
    """How many trainings the grid a user would run by hand costs: the model's own norms and
    each uniform family the space offers (the default compute budget of a staged search)."""
    return len(_baseline_params(slots, params))


def random_params(
    params: Parameters,
    count: int,
    seed: int | None,
    taken: Sequence[dict[str, str]] = (),
) -> list[tuple[str, dict[str, str]]]:
    """``count`` random per-slot configs (each parameter uniform over its choices, seeded),
    none equal to one in ``taken``: the staged search screens them next to the uniform
    baselines, as Hyperband screens random configs, because mixed configs can beat every
    uniform one."""
    rng = random.Random(0 if seed is None else seed)
    seen = [dict(t) for t in taken]
    out: list[tuple[str, dict[str, str]]] = []
    for _ in range(20 * count):  # small spaces run out of new configs: stop trying
        if len(out) == count:
            break
        chosen = {name: rng.choice(labels) for name, (labels, _) in params.items()}
        if chosen not in seen:
            seen.append(chosen)
            out.append((f"random:{len(out) + 1}", chosen))
    return out


def _plain_choice(label: str, name: str) -> bool:
    """Whether ``label`` is the registry choice ``name`` without a weight-side part."""
    choice = NormChoice.parse(label)
    return choice.name == name and choice.weight is None


def warm_start_params(
    slots: Sequence[Slot],
    params: Parameters,
    budget: Budget | None,
    learned: NormConfig | None,
    default: NormConfig | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """The warm-start trials in order: own norms, the user's default config, the learned
    config, the recommended config, uniform SwitchableNorm, then the uniform families (each
    config once, and only where the space offers it). The order matters where the budget
    screens only the first few."""
    baselines = _baseline_params(slots, params, (SWITCHABLE, *UNIFORM_FAMILIES))
    out = baselines[:1]
    if default is not None:
        out.append((DEFAULT_CONFIG, default_params(default, slots, params)))
    for label, config in (("learned", learned), ("recommend", recommend(slots, budget))):
        chosen = None if config is None else params_for(config, slots, params)
        if chosen is not None:
            out.append((label, chosen))
    out.extend(baselines[1:])
    unique: list[tuple[str, dict[str, str]]] = []
    for label, chosen in out:
        if chosen not in [c for _, c in unique]:
            unique.append((label, chosen))
    return unique
