"""Which nodes of a traced model depend on the image: the walk that the conversion and the demand analysis share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Set

import torch.fx as fx

from .errors import TracingError
from .registry import RuleEntry, RuleRegistry


@dataclass
class ImageDependence:
    """The image placeholder, and every node that reads an image-dependent value, in graph order.

    Attributes:
        image: the first placeholder (the image).
        steps: ``(node, op, entry)`` for each node with an image-dependent input: ``op`` is the module, the
            function or the method name; ``entry`` its rule, or None when it has none.
        dependent: the nodes whose values depend on the pixels (not those that read only metadata).
    """

    image: fx.Node
    steps: List[tuple] = field(default_factory=list)
    dependent: Set[fx.Node] = field(default_factory=set)

    def inputs(self, node: fx.Node) -> List[fx.Node]:
        """The image-dependent inputs of ``node``."""
        return [arg for arg in node.all_input_nodes if arg in self.dependent]


def operation(traced: fx.GraphModule, node: fx.Node) -> Any:
    """The module of a ``call_module`` node; the function or method name of the others."""
    return traced.get_submodule(node.target) if node.op == "call_module" else node.target


def image_dependence(traced: fx.GraphModule, registry: RuleRegistry) -> ImageDependence:
    """Walks the graph from the image placeholder and looks up the rule of every node it reaches.

    Raises:
        TracingError: if the model takes no input.
    """
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    if not placeholders:
        raise TracingError(f"{type(traced).__name__}.forward takes no input to mask.")
    walk = ImageDependence(placeholders[0], dependent={placeholders[0]})
    for node in traced.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or not walk.inputs(node):
            continue
        op = operation(traced, node)
        entry: Optional[RuleEntry] = registry.find(op)
        walk.steps.append((node, op, entry))
        if entry is None or not entry.metadata:
            walk.dependent.add(node)
    return walk
