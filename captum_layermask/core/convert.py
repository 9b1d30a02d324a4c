"""Model -> traced graph -> graph with a mask stream -> layer-masked module (paper section 3.2).

``layer_masked`` is a pure transform: it traces the model with ``torch.fx``, replaces every operation that
depends on the image by a call of its masking rule (each node then carries a value and a mask), and returns a
new module that shares the model's submodules and parameters. The model itself is left as it was.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .capture import ExportedGraphs, first_line, model_signature
from .composite import conversion_registry, ring_rules
from .dependence import image_dependence
from .errors import LayerMaskError, TracingError, UnsupportedLayerError
from .gathering import TokenBlocks, insert_gathering, mark_token_blocks, token_regions
from .masked import Masked, align_rank, map_leaves, map_masked
from .model import LayerMaskedModel, input_signature
from .modes import eval_mode
from .parts import build_parts, part_model_builder, zero_fill
from .registry import RuleCall, RuleEntry, RuleRegistry, call_method, leaf_functions, leaf_registry, load_rule_sets


def masked_input(image: Tensor, mask: Optional[Tensor]) -> Any:
    """The first node of a layer-masked graph: pairs the image with its mask (or passes it on if none).

    Removed pixels are set to 0 by selection, the one place where their values (possibly NaN or inf) are read:
    from here on they are finite, so that every later rule can mask by multiplication.
    """
    return image if mask is None else Masked(torch.where(mask > 0, image, 0), mask)


def masked_output(tree: Any) -> Tuple[Any, Any]:
    """The last node: the outputs, each tensor with 0 in the cells (or samples) that see no visible pixel, and
    their output masks (:func:`output_mask`), both in the output's structure."""
    values = map_masked(tree, lambda out: zero_fill(out.value, out.mask))
    return values, map_leaves(tree, output_mask)


def output_mask(leaf: Any) -> Any:
    """Which cells of an output leaf are visible: ``True`` where the mask stream marks the cell, i.e. where some
    visible pixel reaches it through the layer rules (a convolution's cell sees its window, a pooled feature any
    visible cell); everything for a tensor that no pixel reaches (or when no mask was given); None for a
    non-tensor. A bool tensor of the output's rank, broadcastable to it (size 1 along channels)."""
    if isinstance(leaf, Masked):
        return align_rank(leaf.mask, leaf.value.ndim) > 0
    if isinstance(leaf, Tensor):
        return torch.ones((1,) * leaf.ndim, dtype=torch.bool, device=leaf.device)
    return None


class _RuleTracer(fx.Tracer):
    """Traces into every module and function except those that have a rule or are registered leaves (and the
    modules ``torch.fx`` keeps whole by default)."""

    def __init__(self, registry: RuleRegistry, leaves: RuleRegistry) -> None:
        super().__init__(autowrap_functions=leaf_functions(registry, leaves))
        self.registry, self.leaves = registry, leaves
        # buffers read in forward stay attributes of the graph: computed with at every call (FrozenBatchNorm2d's
        # scale from its statistics), not folded into constants that a later load_state_dict would not reach
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            self.registry.find(module) is not None
            or self.leaves.find(module) is not None
            or super().is_leaf_module(module, qualified_name)
        )

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        self._tensor_names: Dict[int, str] = {}
        if isinstance(root, nn.Module):
            for name, tensor in (*root.named_parameters(), *root.named_buffers()):
                self._tensor_names.setdefault(id(tensor), name)
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        # torch.fx finds a parameter's name by a linear search of the model's parameters at every access,
        # quadratic in the model's size; the names are looked up once here instead.
        is_tensor = isinstance(attr_val, nn.Parameter) or (
            self.proxy_buffer_attributes and isinstance(attr_val, Tensor)
        )
        name = self._tensor_names.get(id(attr_val)) if is_tensor else None
        if name is None or self.param_shapes_constant:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def trace(
    model: nn.Module,
    registry: Optional[RuleRegistry] = None,
    *,
    leaves: Sequence[Any] = (),
    token_blocks: Optional[TokenBlocks] = None,
) -> fx.GraphModule:
    """Traces the model's inference graph (eval mode), restoring every submodule's training flag afterwards.

    Modules and functions that have a rule in ``registry`` (by default the rules of ``layer_masked(model)``),
    ``leaves`` and the registered leaves (:func:`~captum_layermask.register_leaf`), are not traced into: each
    stays one operation of the graph. Nodes inside ``token_blocks`` (default: the registered ones) are marked.

    Raises:
        TracingError: if ``torch.fx`` cannot trace the model.
    """
    load_rule_sets(model)
    registry = registry or conversion_registry("neighbor", "intersection", None)
    optional = _optional_inputs(model)
    try:
        with eval_mode(model):
            try:
                tracer = _RuleTracer(registry, leaf_registry(leaves))
                graph = tracer.trace(model, optional or None)
            except Exception:
                if not optional:
                    raise
                # the forward branches on another input too (timm's ``is_causal``): traced as given
                tracer = _RuleTracer(registry, leaf_registry(leaves))
                graph = tracer.trace(model)
            mark_token_blocks(graph, model, token_blocks)
    except Exception as error:
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}). Layer masking "
            "needs a traceable forward; make the submodule or function that contains the failing code one "
            "operation with captum_layermask.register_leaf, and give it a rule with register_rule."
        ) from error
    return share_submodules(fx.GraphModule(tracer.root, graph, type(model).__name__), tracer.root)


def share_submodules(graph_module: fx.GraphModule, root: nn.Module) -> fx.GraphModule:
    """Gives ``graph_module`` the root's own submodules where ``torch.fx`` made empty containers for them.

    ``torch.fx`` copies what a graph reads attribute by attribute: a module that is traced into (a
    ``FrozenBatchNorm2d``) reappears as an empty ``nn.Module`` holding references to its buffers. Those are shared
    until ``.to()`` or ``.double()`` replaces them in one module and not the other; with the root's submodules in
    their place, the graph reads the model's own buffers whatever is done to either.
    """
    for name, child in list(graph_module.named_children()):
        original = getattr(root, name, None)
        if type(child) is nn.Module and isinstance(original, nn.Module) and original is not child:
            setattr(graph_module, name, original)
    return graph_module


def _optional_inputs(model: nn.Module) -> Dict[str, None]:
    """The forward's inputs after the image that default to ``None``, traced as ``None`` first: ``torch.fx`` would
    otherwise trace ``if mask is not None`` (Hiera's) with a proxy, take the branch, and the graph would fail
    when called without them. If that trace fails, the model is traced with them as proxies. Not for Hugging Face
    models: ``torch.fx`` would return their output objects (``ImageClassifierOutput``) as plain dicts, and
    ``torch.export``, which keeps them, captures them instead."""
    if type(model).__module__.startswith("transformers."):
        return {}
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a signature: traced as torch.fx does by default
        return {}
    return {parameter.name: None for parameter in parameters if parameter.default is None}


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


def add_mask_stream(
    traced: fx.GraphModule,
    registry: Optional[RuleRegistry] = None,
    *,
    prune_padding: bool = True,
    gather_tokens: bool = True,
) -> fx.GraphModule:
    """Rewrites a traced model so that every image-dependent node computes a (value, mask) pair.

    The new graph takes ``(image, mask, *other_inputs)``. Nodes that do not depend on the image (parameter
    arithmetic, shape queries) are copied unchanged; every other node calls its rule through a
    :class:`~captum_layermask.core.registry.RuleCall`.

    Args:
        traced (fx.GraphModule): the traced model (:func:`trace`).
        registry: the rules (by default those of ``layer_masked(model)``).
        prune_padding (bool): let convolutions pad only the rings later layers read (the same outputs).
        gather_tokens (bool): run chains of transformer blocks on the visible tokens only (the same outputs;
            :mod:`~captum_layermask.core.gathering`).

    Raises:
        UnsupportedLayerError: listing every image-dependent operation that has no rule.
    """
    registry = registry or conversion_registry("neighbor", "intersection", None)
    walk = image_dependence(traced, registry)
    unsupported = [_describe(node, op) for node, op, entry in walk.steps if entry is None]
    if unsupported:
        raise UnsupportedLayerError(
            f"{type(traced).__name__} has {len(unsupported)} operation(s) without a masking rule: "
            f"{', '.join(unsupported)}. Register one with captum_layermask.register_rule(<module class, function "
            "or method name>) or pass layer_masked(model, rules={...}) (docs/custom-layers.md)."
        )
    rings = ring_rules(walk, prune_padding)
    graph = fx.Graph()
    env: Dict[fx.Node, Any] = {}
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    taken = {node.target for node in traced.graph.nodes if node.op == "placeholder"}
    with graph.inserting_after(env[walk.image]):  # the model's own inputs may include a "mask" (Hiera's)
        name = next(name for name in ("mask", "layer_mask", "_layer_mask") if name not in taken)
        image_default = env[walk.image].args  # a placeholder after one with a default needs one too (HF)
        mask = graph.placeholder(name, default_value=None) if image_default else graph.placeholder(name)
    env[walk.image] = graph.call_function(masked_input, (env[walk.image], mask))
    rule_of = {node: (op, entry) for node, op, entry in walk.steps}
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph.output(graph.call_function(masked_output, (fx.map_arg(node.args[0], env.__getitem__),)))
        elif node not in rule_of:
            env[node] = graph.node_copy(node, env.__getitem__)
        else:
            op, entry = rule_of[node]
            env[node] = _rule_node(graph, node, op, rings.get(node, entry), env, registry)
    if gather_tokens:
        insert_gathering(graph, token_regions(traced, walk.dependent), env)
    graph.lint()
    return share_submodules(fx.GraphModule(traced, graph, f"LayerMasked{type(traced).__name__}"), traced)


def _rule_node(
    graph: fx.Graph, node: fx.Node, op: Any, entry: RuleEntry, env: Dict[fx.Node, Any], registry: RuleRegistry
) -> fx.Node:
    args = fx.map_arg(node.args, env.__getitem__)
    kwargs = fx.map_arg(node.kwargs, env.__getitem__)
    if node.op == "call_module":
        target = RuleCall(entry.rule, None, node.target, type(op).__name__, registry)
        args = (graph.create_node("get_attr", node.target, name=f"{node.name}_module"), *args)
    elif node.op == "call_method":
        target = RuleCall(entry.rule, call_method(node.target), _module_path(node), node.target, registry)
    else:
        target = RuleCall(entry.rule, op, _module_path(node), _op_name(op), registry)
    return graph.create_node("call_function", target, args, kwargs, name=node.name)


def layer_masked(
    model: nn.Module,
    *,
    padding: str = "neighbor",
    residual: str = "intersection",
    rules: Optional[Mapping[Any, Any]] = None,
    prune_padding: bool = True,
    gather_tokens: bool = True,
    output: Union[None, int, str] = None,
    leaves: Sequence[Any] = (),
    token_blocks: Optional[Mapping[type, Any]] = None,
    capture: str = "auto",
) -> LayerMaskedModel:
    """Turns a CNN into a mask-aware model that runs on the visible pixels only (paper section 3).

    Args:
        model (nn.Module): a CNN taking images ``(N, C, H, W)`` as its first input, e.g. any torchvision
            classification CNN. It is not modified.
        padding (str): how convolutions see removed cells next to visible ones: ``"neighbor"`` (the paper's
            neighbor padding, Algorithm 1), ``"zero"`` (zeros; the paper's ablation) or ``"partial"`` (partial
            convolution's rescaling; supplementary section 2).
        residual (str): how a sum of two masked activations combines their masks: ``"intersection"`` (the
            paper's ``m1 * m2``; a region that a strided shortcut does not sample is removed) or ``"union"``
            (every visible cell of either summand is kept, the other summand neighbor-padded there; see
            docs/masking.md).
        rules (Mapping, optional): masking rules for this conversion only, ``{target: rule}``, consulted before
            the registered ones (see :func:`register_rule`).
        prune_padding (bool): let convolutions pad only the rings of neighbor padding that later layers read
            (the demand analysis; the outputs are the same). False pads every convolution's full reach.
        gather_tokens (bool): run chains of transformer blocks (torchvision's and timm's ViT blocks, and those
            declared with ``register_token_block``) on each sample's visible tokens only, instead of masking
            removed ones in attention: the same outputs, faster. False masks attention throughout.
        output (int or str, optional): the part of the model's output to return, for a model that returns a
            tuple, a dict or an output object: an index (``0``: the first tensor) or a key or attribute name
            (``"logits"``, ``"out"``). Captum's methods need one tensor of scores. Default: the whole output.
        leaves (sequence, optional): module classes and functions traced as one operation in this conversion,
            besides the registered ones (see :func:`register_leaf`).
        token_blocks (Mapping, optional): ``{block class: check or None}`` for this conversion, instead of the
            registered token blocks (see :func:`register_token_block`).
        capture (str): how the model becomes a graph: ``"fx"`` (``torch.fx`` symbolic tracing, once, for every
            input shape), ``"export"`` (``torch.export``, at the first call of each input shape; for models whose
            ``forward`` branches on shapes, e.g. Hugging Face ``transformers``) or ``"auto"`` (``torch.fx``, and
            ``torch.export`` when tracing fails; by parts for the registered model classes, torchvision's
            detectors) or ``"parts"`` (each traceable submodule converted on its own, the Python between them run
            as written, :mod:`~captum_layermask.core.parts`). See docs/design.md ("Two capture paths").

    Returns:
        A :class:`LayerMaskedModel` called as ``masked(x, mask)``; for a model converted by parts, a
        :class:`~captum_layermask.core.parts.LayerMaskedParts` called as ``masked(images, masks)`` (for a
        detector, :class:`~captum_layermask.integrations.detection.LayerMaskedDetector`).

    Raises:
        UnsupportedLayerError: naming every operation that has no masking rule and where it is.
        TracingError: if the model cannot be traced by ``torch.fx`` (``capture="fx"``); under ``"auto"`` and
            ``"export"``, at the first call, if ``torch.export`` cannot capture it either (with both reasons).

    Examples::

        >>> model = torchvision.models.resnet50().eval()
        >>> masked = layer_masked(model)
        >>> logits = masked(images, mask)  # mask: 1 = visible, 0 = removed
    """
    options = dict(
        padding=padding,
        residual=residual,
        rules=dict(rules) if rules else None,
        prune_padding=prune_padding,
        gather_tokens=gather_tokens,
        output=output,
        leaves=tuple(leaves),
        token_blocks=dict(token_blocks) if token_blocks is not None else None,
        capture=capture,
    )
    if isinstance(model, LayerMaskedModel):
        if options == model.options:
            return model
        raise LayerMaskError("this model is already layer-masked; pass the original model to layer_masked.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_masked takes a torch.nn.Module, got {type(model).__name__}.")
    if output is not None and not isinstance(output, (int, str)):
        raise TypeError(f"output is an index or a key of the model's output, got {type(output).__name__}.")
    if capture not in ("auto", "fx", "export", "parts"):
        raise ValueError(f"capture is 'auto', 'fx', 'export' or 'parts', got {capture!r}.")
    load_rule_sets(model)
    registry = conversion_registry(padding, residual, rules)  # checks the options
    mask_graph = functools.partial(
        add_mask_stream, registry=registry, prune_padding=prune_padding, gather_tokens=gather_tokens
    )
    builder = part_model_builder(model)
    if capture == "parts" or (capture == "auto" and builder is not None):
        if output is not None:
            raise LayerMaskError(
                "output= selects a part of a traced model's output; a model converted by parts "
                "returns the model's own output."
            )

        def convert(module: nn.Module) -> fx.GraphModule:
            return mask_graph(trace(module, registry, leaves=leaves, token_blocks=options["token_blocks"]))

        return (builder or build_parts)(model, options, convert, registry)
    fx_reason = None
    if capture != "export":
        try:
            traced = trace(model, registry, leaves=leaves, token_blocks=options["token_blocks"])
        except TracingError as error:
            if capture == "fx":
                raise
            fx_reason = first_line(error.__cause__ or error)
        else:
            return LayerMaskedModel(mask_graph(traced), model, options, input_signature(traced))
    graphs = ExportedGraphs(model, mask_graph, fx_reason, options["token_blocks"])
    return LayerMaskedModel(graphs, model, options, model_signature(model))


def _rebuild(
    source: nn.Module, options: Mapping[str, Any], state: Mapping[str, Any], training: bool
) -> LayerMaskedModel:
    masked = layer_masked(source, **options)
    masked.load_state_dict(state)
    return masked.train(training)


def _reduce(masked: LayerMaskedModel) -> tuple:
    """How a layer-masked model pickles (and deep-copies): the original model and the conversion's options, so
    that loading converts again."""
    return (_rebuild, (masked._source, masked.options, masked.state_dict(), masked.training))


copyreg.pickle(LayerMaskedModel, _reduce)
