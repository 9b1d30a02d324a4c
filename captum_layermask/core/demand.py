"""Which kept cells are ever read: how many rings of neighbor padding each convolution needs (an optimisation).

A convolution grows the mask (a cell is kept when its window sees a visible cell) and a residual sum shrinks
it again (the mask of ``x1 + x2`` is ``m1 * m2``, section 3.2). In a residual block the sum takes the block
input's mask, so the cells that the block's last convolution added are never read, and neither are the padded
values that only those cells read. Padding fewer rings there changes no value that any later layer reads, so
the model's outputs are the same.

Masks are described without data, as ``(root, k)``: the mask of graph node ``root`` dilated ``k`` times by a
3x3 window. A centred stride-1 convolution of radius ``r`` adds ``r``; a per-cell operation keeps its input's
description, and one with several inputs of the same root takes the smallest ``k`` (the masks are nested);
anything else starts a new root. Demands run backwards in the same terms: a node's demand is the ``k`` of the
largest dilation of its root whose cells its consumers read. Whatever this cannot describe is read in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch.fx as fx
from torch import nn

from .dependence import ImageDependence
from .primitives import centred_radius, receptive_reach


@dataclass(frozen=True)
class _Growth:
    root: fx.Node
    steps: int


def _dilating_radius(module: nn.Module) -> Optional[int]:
    """The radius of a stride-1 ``nn.Conv2d`` whose output mask is its input mask dilated that many times."""
    if not isinstance(module, nn.Conv2d) or tuple(module.stride) != (1, 1):
        return None
    return centred_radius(module.kernel_size, module.padding, module.dilation, module.padding_mode)


class _Graph:
    """The image-dependent nodes of a traced model and the kind of each one's rule."""

    def __init__(self, walk: ImageDependence, convolutions: Dict[fx.Node, nn.Conv2d]) -> None:
        self.nodes: List[fx.Node] = []
        self.radius: Dict[fx.Node, int] = {}
        self.per_cell: Dict[fx.Node, str] = {}
        for node, _, entry in walk.steps:
            if entry is None or entry.metadata:
                continue
            self.nodes.append(node)
            radius = _dilating_radius(convolutions[node]) if node in convolutions else None
            if radius is not None:
                self.radius[node] = radius
            elif entry.per_cell is not None:
                self.per_cell[node] = entry.per_cell
        self.image = walk.image
        self.dependent = walk.dependent
        self.inputs = walk.inputs


def _growths(graph: _Graph) -> Dict[fx.Node, _Growth]:
    growth = {graph.image: _Growth(graph.image, 0)}
    for node in graph.nodes:
        inputs = [growth[arg] for arg in graph.inputs(node)]
        if node in graph.radius and len(inputs) == 1 and node.args[0] in graph.dependent:
            growth[node] = _Growth(inputs[0].root, inputs[0].steps + graph.radius[node])
        elif node in graph.per_cell and len({g.root for g in inputs}) == 1:
            combine = max if graph.per_cell[node] == "union" else min  # the union of nested masks is the largest
            growth[node] = _Growth(inputs[0].root, combine(g.steps for g in inputs))
        else:
            growth[node] = _Growth(node, 0)
    return growth


def _demands(graph: _Graph, growth: Dict[fx.Node, _Growth]) -> Dict[fx.Node, int]:
    """For every node read by another, the dilation (of its root) within which its cells are read."""
    demand: Dict[fx.Node, int] = {}

    def read(node: fx.Node, steps: int) -> None:
        steps = min(steps, growth[node].steps)  # only visible cells are ever read
        demand[node] = max(demand.get(node, steps), steps)

    for node in reversed(list(growth)):  # users before their inputs
        for user in node.users:
            if user.op == "output":
                read(node, growth[node].steps)
            elif user not in demand:  # reads only shapes, or its own result is never read
                continue
            elif user in graph.radius and user.args[0] is node and len(graph.inputs(user)) == 1:
                read(node, min(demand[user], growth[user].steps) + graph.radius[user])
            elif user in graph.per_cell and growth[user].root is growth[node].root:
                read(node, demand[user])
            else:
                read(node, growth[node].steps)
    return demand


def padding_rings(walk: ImageDependence, convolutions: Dict[fx.Node, nn.Conv2d]) -> Dict[fx.Node, int]:
    """The convolutions that need fewer rings of neighbor padding than their reach, with the number they need.

    Args:
        walk (ImageDependence): the image-dependent nodes of the traced model and their rules
            (:func:`~captum_layermask.core.dependence.image_dependence`).
        convolutions: the convolution nodes whose rule is the built-in neighbor padding (see
            :func:`~captum_layermask.core.composite.neighbor_convolutions`); only these are considered.

    Returns:
        ``{conv node: rings}`` with ``rings`` smaller than the kernel's reach; every other convolution pads its
        full reach.
    """
    graph = _Graph(walk, convolutions)
    growth = _growths(graph)
    demand = _demands(graph, growth)
    needed: Dict[fx.Node, int] = {}
    for node, radius in graph.radius.items():
        reach = receptive_reach(convolutions[node].kernel_size)
        read = min(demand.get(node, 0), growth[node].steps)
        rings = max(0, min(reach, read + radius - growth[node.args[0]].steps))
        if rings < reach:
            needed[node] = rings
    return needed
