"""The structure of a model's slots: groups by stage and by role, for refining a config a few
slots at a time.

A model with many slots has too many per-slot combinations for a few trainings to explore; its
slots are not independent either: the norms of one stage see inputs of one scale, shortcuts and
heads play their own part, attention and MLP norms in a transformer see different statistics.
:func:`slot_groups` names those groups from the slot names alone (module paths), so the staged
search can change one group at a time.

- role: ``shortcut`` (a path through ``downsample``/``shortcut``/``skip``/...), ``attention`` and
  ``mlp`` (transformer blocks), ``stem`` and ``head`` (slots before the first and after the last
  numbered block), else ``main``;
- stage: the container of the numbered blocks a slot sits in (``layer1`` of ``layer1.0.bn1``);
  one container holding every block (``model.layers.3``) is split into an early and a late half.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Name parts that mark a slot on a residual shortcut.
_SHORTCUT = ("downsample", "shortcut", "skip", "residual", "proj_res", "identity_conv")
#: Name parts that mark the attention side of a transformer block.
_ATTENTION = ("attn", "attention", "input_layernorm", "ln_1", "norm1", "self_attn_layer_norm")
#: Name parts that mark the MLP side of a transformer block.
_MLP = ("mlp", "ffn", "feed_forward", "post_attention", "ln_2", "norm2", "final_layer_norm")


def _block(name: str) -> tuple[str, int] | None:
    """``(container, block index)`` of the first numbered module on the slot's path, or None.

    ``layer1.0.bn1`` -> ``("layer1", 0)``; ``model.layers.3.input_layernorm`` ->
    ``("model.layers", 3)``; a slot whose own name is the number (``features.1``) is not in a
    block: it is a layer of a plain Sequential.
    """
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:index]), int(part)
    return None


def _role(name: str, in_block: bool, before_blocks: bool) -> str:
    parts = [p.lower() for p in name.split(".")]
    if any(key in part for part in parts for key in _SHORTCUT):
        return "shortcut"
    if any(key in part for part in parts for key in _MLP):  # first: "post_attention_layernorm"
        return "mlp"
    if any(key in part for part in parts for key in _ATTENTION):
        return "attention"
    if not in_block:
        return "stem" if before_blocks else "head"
    return "main"


def slot_groups(slot_names: Sequence[str]) -> dict[str, list[str]]:
    """Groups of slots worth changing together, each named ``"<kind>:<key>"``, coarse first.

    Four kinds, each a partition of the slots (so a slot is in one group per kind): ``role:``
    (every shortcut, every attention norm, the stem, the head, ...), ``stage:`` (the slots of
    one stage of blocks), ``stage-role:`` (one role within one stage) and ``slot:`` (one slot).
    A kind that puts every slot in one group (or, but for ``slot:``, each in its own) says
    nothing and is left out, as is a group equal to an earlier one.

    Example::

        >>> groups = slot_groups(["bn1", "layer1.0.bn1", "layer1.0.downsample.1", "layer2.0.bn1"])
        >>> groups["role:shortcut"], groups["stage:layer1"]
        (['layer1.0.downsample.1'], ['layer1.0.bn1', 'layer1.0.downsample.1'])
    """
    blocks = {name: _block(name) for name in slot_names}
    first_block = next((i for i, n in enumerate(slot_names) if blocks[n] is not None), None)
    containers: dict[str, list[int]] = {}
    for found in blocks.values():
        if found is not None:
            containers.setdefault(found[0], []).append(found[1])
    single = len(containers) == 1
    kinds: dict[str, dict[str, list[str]]] = {"role": {}, "stage": {}, "stage-role": {}}
    for index, name in enumerate(slot_names):
        found = blocks[name]
        before = first_block is None or index < first_block
        role = _role(name, found is not None, before)
        if found is None:
            stage = role  # stem / head slots are their own stage
        elif single:  # one container of all blocks: early and late halves of the depth
            indices = sorted(set(containers[found[0]]))
            stage = "early" if found[1] < indices[len(indices) // 2] else "late"
        else:
            stage = found[0]
        kinds["role"].setdefault(role, []).append(name)
        kinds["stage"].setdefault(stage, []).append(name)
        kinds["stage-role"].setdefault(f"{stage}/{role}", []).append(name)
    kinds["slot"] = {name: [name] for name in slot_names}
    groups: dict[str, list[str]] = {}
    seen: set[frozenset[str]] = set()
    for kind, parts in kinds.items():
        if not 1 < len(parts) <= len(slot_names) or (
            kind != "slot" and len(parts) == len(slot_names)
        ):
            continue
        for key, names in parts.items():
            if frozenset(names) not in seen:  # the same slots under two kinds: keep the first
                seen.add(frozenset(names))
                groups[f"{kind}:{key}"] = names
    return groups
