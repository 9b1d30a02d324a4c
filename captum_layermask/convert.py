"""Model -> traced graph -> graph with a mask stream -> layer-masked module (paper section 3.2).

``layer_masked`` is a pure transform: it traces the model with ``torch.fx``, replaces every operation that
depends on the image by a call of its masking rule (each node then carries a value and a mask), and returns a
new module that shares the model's submodules and parameters. The model itself is left as it was.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Set

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from .baseline import check_no_baseline, mask_from_baseline
from .errors import LayerMaskError, TracingError, UnsupportedLayerError
from .masked import Masked, align_rank, format_mask, map_masked
from .registry import RULES, RuleCall, RuleEntry, RuleRegistry, call_method
from .demand import padding_rings
from .rules import PADDING_RULES, conv2d_with_rings


def masked_input(image: Tensor, mask: Optional[Tensor]) -> Any:
    """The first node of a layer-masked graph: pairs the image with its mask (or passes it on if none).

    Removed pixels are set to 0 by selection, the one place where their values (possibly NaN or inf) are read:
    from here on they are finite, so that every later rule can mask by multiplication.
    """
    return image if mask is None else Masked(torch.where(mask > 0, image, 0), mask)


def masked_output(tree: Any) -> Any:
    """The last node: each output tensor with 0 in cells (or samples) that see no visible pixel."""
    return map_masked(tree, lambda out: torch.where(align_rank(out.mask, out.value.ndim) > 0, out.value, 0))


class _RuleTracer(fx.Tracer):
    """Traces into every module except those a rule (or ``torch.fx`` by default) treats as one operation."""

    def __init__(self, registry: RuleRegistry) -> None:
        super().__init__()
        self.registry = registry

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return self.registry.find(module) is not None or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, registry: RuleRegistry = RULES) -> fx.GraphModule:
    """Traces the model's inference graph (eval mode), restoring every submodule's training flag afterwards.

    Raises:
        TracingError: if ``torch.fx`` cannot trace the model.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        tracer = _RuleTracer(registry)
        graph = tracer.trace(model)
    except Exception as error:
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}). Layer masking "
            "needs a traceable forward; register the submodule that contains the failing code as one operation "
            "with captum_layermask.register_rule."
        ) from error
    finally:
        for module, training in modes.items():
            module.training = training
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _op_name(target: Any) -> str:
    return getattr(target, "__name__", type(target).__name__)


def _describe(node: fx.Node, op: Any) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(op).__module__}.{type(op).__qualname__})"
    where = f" in '{_module_path(node)}'" if _module_path(node) else ""
    if node.op == "call_method":
        return f"Tensor.{node.target}{where}"
    return f"{getattr(op, '__module__', '') or ''}.{_op_name(op)}{where}".lstrip(".")


def add_mask_stream(traced: fx.GraphModule, registry: RuleRegistry = RULES) -> fx.GraphModule:
    """Rewrites a traced model so that every image-dependent node computes a (value, mask) pair.

    The new graph takes ``(image, mask, *other_inputs)``. Nodes that do not depend on the image (parameter
    arithmetic, shape queries) are copied unchanged; every other node calls its rule through a
    :class:`~captum_layermask.registry.RuleCall`.

    Raises:
        UnsupportedLayerError: listing every image-dependent operation that has no rule.
    """
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    if not placeholders:
        raise TracingError(f"{type(traced).__name__}.forward takes no input to mask.")
    graph = fx.Graph()
    env: Dict[fx.Node, Any] = {node: graph.node_copy(node) for node in placeholders}
    image = placeholders[0]
    with graph.inserting_after(env[image]):
        mask = graph.placeholder("mask")
    env[image] = graph.call_function(masked_input, (env[image], mask))
    dependent: Set[fx.Node] = {image}
    unsupported: List[str] = []
    rings = padding_rings(traced, registry)
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph.output(graph.call_function(masked_output, (fx.map_arg(node.args[0], env.__getitem__),)))
            continue
        if node.op == "get_attr" or not any(arg in dependent for arg in node.all_input_nodes):
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        op = traced.get_submodule(node.target) if node.op == "call_module" else node.target
        entry = registry.find(op if node.op != "call_method" else node.target)
        if entry is None:
            unsupported.append(_describe(node, op))
            dependent.add(node)
            env[node] = None
            continue
        if not entry.metadata:
            dependent.add(node)
        if node in rings:
            entry = RuleEntry(entry.target, conv2d_with_rings(rings[node]))
        env[node] = _rule_node(graph, node, op, entry, env)
    if unsupported:
        raise UnsupportedLayerError(
            f"{type(traced).__name__} has {len(unsupported)} operation(s) without a masking rule: "
            f"{', '.join(unsupported)}. Register one with captum_layermask.register_rule(<module class, function "
            "or method name>) or pass layer_masked(model, rules={...}) (README: 'Custom layers')."
        )
    graph.lint()
    return fx.GraphModule(traced, graph, f"LayerMasked{type(traced).__name__}")


def _rule_node(graph: fx.Graph, node: fx.Node, op: Any, entry: RuleEntry, env: Dict[fx.Node, Any]) -> fx.Node:
    args = fx.map_arg(node.args, env.__getitem__)
    kwargs = fx.map_arg(node.kwargs, env.__getitem__)
    if node.op == "call_module":
        target = RuleCall(entry.rule, None, node.target, type(op).__name__)
        args = (graph.create_node("get_attr", node.target, name=f"{node.name}_module"), *args)
    elif node.op == "call_method":
        target = RuleCall(entry.rule, call_method(node.target), _module_path(node), node.target)
    else:
        target = RuleCall(entry.rule, op, _module_path(node), _op_name(op))
    return graph.create_node("call_function", target, args, kwargs, name=node.name)


class LayerMaskedModel(nn.Module):
    """A CNN that runs on the visible pixels of its input only (layer masking, paper section 3).

    Built by :func:`layer_masked`; shares the original model's submodules and parameters. The masked graph is
    ``self.graph_module`` (``print(masked.graph_module.code)`` shows it).
    """

    decodes_layer_mask = True  # it recognises LayerMask() baselines (see captum_layermask.baseline)

    def __init__(self, graph_module: fx.GraphModule, padding: str, training: bool, required_inputs: int) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.padding = padding
        self.required_inputs = required_inputs
        self.training = training
        graph_module.training = training

    def forward(self, x: Tensor, *args: Any, mask: Optional[Tensor] = None, **kwargs: Any) -> Any:
        """Runs the model on the visible pixels of ``x``.

        Args:
            x (Tensor): images, shape ``(N, C, H, W)``.
            *args: the model's further inputs, passed on unmasked. One positional argument more than the model
                requires is the mask: ``masked(x, mask)`` for a model that takes only images.
            mask (Tensor, optional): 1 (True) for visible pixels, 0 for removed ones; shape ``(H, W)``,
                ``(N, H, W)``, ``(N, 1, H, W)`` or ``(1, 1, H, W)``. Removed pixels have no influence on the
                output, whatever their values. If None, pixels set to a :class:`~captum_layermask.LayerMask`
                baseline by Captum are removed, and without any the output is exactly ``model(x)``.
            **kwargs: further keyword inputs of the model.

        Returns:
            The model's output, same structure, shapes and dtypes; outputs that see no visible pixel (e.g. the
            logits of an image whose mask is all 0) are 0.
        """
        if mask is None and len(args) == self.required_inputs:
            *args, mask = args
        if mask is None and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            mask = mask_from_baseline(x)
            for index, value in enumerate((*args, *kwargs.values())):
                check_no_baseline(value, f"input {index + 2} of the model")
        if mask is not None:
            mask = format_mask(mask, x)
        return self.graph_module(x, mask, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}"


def _registry_for(padding: str, rules: Optional[Mapping[Any, Any]]) -> RuleRegistry:
    if padding not in PADDING_RULES:
        raise ValueError(f"padding must be one of {sorted(PADDING_RULES)}, got {padding!r}.")
    registry = RuleRegistry()
    for target, rule in (rules or {}).items():
        registry.add([target], rule, first=False)
    registry.add([nn.Conv2d, torch.nn.functional.conv2d], PADDING_RULES[padding], first=False)
    registry.entries.extend(RULES.entries)
    return registry


def layer_masked(
    model: nn.Module, *, padding: str = "neighbor", rules: Optional[Mapping[Any, Any]] = None
) -> LayerMaskedModel:
    """Turns a CNN into a mask-aware model that runs on the visible pixels only (paper section 3).

    Args:
        model (nn.Module): a CNN taking images ``(N, C, H, W)`` as its first input, e.g. any torchvision
            classification CNN. It is not modified.
        padding (str): how convolutions see removed cells next to visible ones: ``"neighbor"`` (the paper's
            neighbor padding, Algorithm 1), ``"zero"`` (zeros; the paper's ablation) or ``"partial"`` (partial
            convolution's rescaling; supplementary section 2).
        rules (Mapping, optional): masking rules for this conversion only, ``{target: rule}``, consulted before
            the registered ones (see :func:`register_rule`).

    Returns:
        A :class:`LayerMaskedModel` called as ``masked(x, mask)``.

    Raises:
        UnsupportedLayerError: naming every operation that has no masking rule and where it is.
        TracingError: if the model cannot be traced by ``torch.fx``.

    Examples::

        >>> model = torchvision.models.resnet50().eval()
        >>> masked = layer_masked(model)
        >>> logits = masked(images, mask)  # mask: 1 = visible, 0 = removed
    """
    if isinstance(model, LayerMaskedModel):
        if padding == model.padding and not rules:
            return model
        raise LayerMaskError("this model is already layer-masked; pass the original model to layer_masked.")
    registry = _registry_for(padding, rules)
    traced = trace(model, registry)
    required = sum(1 for node in traced.graph.nodes if node.op == "placeholder" and not node.args)
    return LayerMaskedModel(add_mask_stream(traced, registry), padding, model.training, required)
