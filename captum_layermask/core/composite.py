"""The composite: which rule applies to which operation in one conversion (zennit's term), in one place.

A conversion looks rules up in this order: its own ``rules=``, the rules registered with ``register_rule``,
the convolution and addition rules that its options select, then the built-in rules
(:mod:`~captum_layermask.core.rules`). The options:

- ``padding``: how convolutions see removed cells next to visible ones (:data:`PADDING_RULES`).
- ``residual``: how a sum of two masked activations (a residual connection) combines their masks:
  ``"intersection"`` (the paper's ``m1 * m2``) or ``"union"`` (:func:`~captum_layermask.core.rules.sum_union`).
- ``prune_padding``: whether the demand analysis (:mod:`~captum_layermask.core.demand`) lets convolutions pad
  only the rings that later layers read. It changes no output, only the work; ``False`` pads every
  convolution's full reach (a reference for tests and benchmarks).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

from . import rules
from .demand import padding_rings
from .dependence import ImageDependence
from .registry import BUILTIN_RULES, RULES, RuleEntry, RuleRegistry

PADDING_RULES = {"neighbor": rules.conv2d, "zero": rules.conv2d_zero_padding, "partial": rules.conv2d_partial}
"""The convolution rule behind each ``layer_masked(padding=...)`` choice."""

RESIDUAL_RULES = {"intersection": rules.pointwise, "union": rules.sum_union}
"""The rule of additions behind each ``layer_masked(residual=...)`` choice."""

_CONVOLUTIONS = (nn.Conv2d, torch.nn.functional.conv2d)


def check_options(padding: str, residual: str) -> None:
    """Raises ``ValueError`` for an unknown ``padding`` or ``residual``."""
    if padding not in PADDING_RULES:
        raise ValueError(f"padding must be one of {', '.join(PADDING_RULES)}, got {padding!r}.")
    if residual not in RESIDUAL_RULES:
        raise ValueError(f"residual must be one of {', '.join(RESIDUAL_RULES)}, got {residual!r}.")


def conversion_registry(
    padding: str, residual: str, rules_for_this_conversion: Optional[Mapping[Any, Any]]
) -> RuleRegistry:
    """The rules one conversion uses, in lookup order: its own ``rules=``, the registered user rules and the
    built-in ones, with the convolution and addition rules that ``padding`` and ``residual`` select."""
    check_options(padding, residual)
    registry = RuleRegistry()
    for target, rule in (rules_for_this_conversion or {}).items():
        registry.add([target], rule, first=False)
    registry.entries.extend(RULES.entries)
    registry.add(list(_CONVOLUTIONS), PADDING_RULES[padding], first=False)
    registry.add(list(rules.SUM_TARGETS), RESIDUAL_RULES[residual], first=False, per_cell=residual)
    registry.entries.extend(BUILTIN_RULES.entries)
    return registry


def neighbor_convolutions(walk: ImageDependence) -> Dict[fx.Node, nn.Conv2d]:
    """The image-dependent ``nn.Conv2d`` nodes that the conversion pads with the built-in neighbor padding rule."""
    return {
        node: op
        for node, op, entry in walk.steps
        if isinstance(op, nn.Conv2d) and entry is not None and entry.rule is rules.conv2d
    }


def ring_rules(walk: ImageDependence, prune_padding: bool) -> Dict[fx.Node, RuleEntry]:
    """For each convolution that needs fewer rings than its reach, the rule padding only those."""
    if not prune_padding:
        return {}
    rings = padding_rings(walk, neighbor_convolutions(walk))
    return {node: RuleEntry(nn.Conv2d, rules.conv2d_with_rings(count)) for node, count in rings.items()}
