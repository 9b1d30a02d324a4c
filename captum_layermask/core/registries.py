"""Every process-global registry of the engine in one view, and one way to undo a registration.

All ``register_*`` functions behave alike: each returns what it registered, so that it serves as a decorator
(timm's ``register_notrace_module`` style), and :func:`unregister` undoes it. One conversion can also take rules,
leaves and token blocks of its own (``layer_masked(model, rules=..., leaves=..., token_blocks=...)``), with the
registries as defaults.

- rules: :func:`~captum_layermask.register_rule` (:data:`~captum_layermask.core.registry.RULES`);
- leaves: :func:`~captum_layermask.register_leaf` (:data:`~captum_layermask.core.registry.LEAVES`);
- rule sets of layer libraries: :func:`~captum_layermask.register_rule_set`;
- token blocks: :func:`~captum_layermask.register_token_block`
  (:data:`~captum_layermask.core.gathering.TOKEN_BLOCKS`);
- mask decoders: :func:`~captum_layermask.register_mask_decoder`;
- model classes converted by parts: :func:`~captum_layermask.core.parts.register_part_model`
  (:data:`~captum_layermask.core.parts.PART_MODELS`).
"""

from __future__ import annotations

from typing import Any

from . import registry
from .gathering import TOKEN_BLOCKS
from .model import MASK_DECODERS
from .parts import PART_MODELS


def unregister(*registered: Any) -> None:
    """Undoes every registration of each given rule, leaf, rule-set loader, token block class or mask decoder.

    Args:
        *registered: what a ``register_*`` function returned (a rule function for all the targets it was
            registered for, a leaf class or function, a loader, a block class, a decoder, a part-model builder
            for every class it was registered for), or a model class registered with ``register_part_model``.

    Raises:
        KeyError: if one of them is not registered anywhere (a typo would otherwise leave it in place).
    """
    for thing in registered:
        found = False
        for table in (registry.RULES, registry.LEAVES):
            entries = [e for e in table.entries if e.rule is thing or (e.rule is None and e.target is thing)]
            for entry in entries:
                table.entries.remove(entry)
            found = found or bool(entries)
        for package, load in list(registry.RULE_SETS.items()):
            if load is thing:
                del registry.RULE_SETS[package]
                found = True
        if thing in TOKEN_BLOCKS:
            del TOKEN_BLOCKS[thing]
            found = True
        if id(thing) in MASK_DECODERS and MASK_DECODERS[id(thing)] is thing:
            del MASK_DECODERS[id(thing)]
            found = True
        for model_class, build in list(PART_MODELS.items()):
            if build is thing or model_class is thing:
                del PART_MODELS[model_class]
                found = True
        if not found:
            raise KeyError(f"{thing!r} is not registered: nothing to unregister.")
