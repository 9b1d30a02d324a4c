"""The second capture path: models that ``torch.fx`` cannot trace, captured by ``torch.export``.

``torch.export.export(model, args, strict=False)`` runs the model's Python once on an example input and records
the ATen operations it performs, so shape-dependent control flow, ``int(tensor.shape[i])`` and tuple unpacking
(what stops symbolic tracing in Hugging Face models) are simply executed. The price is that a graph is
specialised to its input's shape: :class:`ExportedGraphs` converts at the first call of each input shape and
keeps the result, with the batch dimension dynamic where export can keep it so (one graph serves every batch
size from 2 up; batch size 1 gets its own graph, as export specialises sizes 0 and 1).

Each captured graph is rewritten into torch functions (:mod:`~captum_layermask.core.aten`) and then given its
mask stream by the same :func:`~captum_layermask.core.convert.add_mask_stream` as a traced one.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .aten import torch_level_graph
from .errors import LayerMaskError, TracingError
from .gathering import TokenBlocks, mark_token_blocks, token_count
from .modes import eval_mode

MaskGraph = Callable[..., fx.GraphModule]


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception as ``Type: first line of its message``, at most ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def export_graph(
    model: nn.Module, args: tuple, kwargs: Dict[str, Any], token_blocks: Optional[TokenBlocks] = None
) -> Tuple[fx.GraphModule, Any, bool]:
    """Captures the model's eval-mode graph on one example call with ``torch.export`` (non-strict); nodes inside
    ``token_blocks`` (default: the registered ones) are marked, as :func:`~captum_layermask.core.convert.trace`
    marks them.

    Returns:
        The graph rewritten into torch functions (its output is the flat list of output leaves), the output's
        tree structure, and whether the graph takes any batch size (else it is specialised to this one).

    Raises:
        Exception: whatever ``torch.export`` raises.
    """
    image = args[0]
    dynamic = torch.export.ShapesCollection()
    if image.shape[0] > 1:
        dynamic[image] = {0: torch.export.Dim.AUTO}
    with eval_mode(model):
        exported = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic or None)
    module = exported.module()
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    value = placeholders[0].meta.get("val")
    batch_dynamic = value is not None and not isinstance(value.shape[0], int)
    graph = torch_level_graph(module)
    mark_token_blocks(graph.graph, model, token_blocks)
    return graph, module._out_spec, batch_dynamic


def _probe_mask(image: Tensor) -> Tensor:
    """A seeded mask that removes the right half of each image and random quarter-by-quarter blocks of its left
    half (the top-left block stays): every sample loses whole patches, different samples different numbers."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.rand(image.shape[0], 1, 4, 4, generator=generator) > 0.5
    blocks[:, :, :, 2:] = False
    blocks[:, :, 0, 0] = True
    mask = F.interpolate(blocks.float(), size=tuple(image.shape[-2:]), mode="nearest")
    return mask.to(device=image.device, dtype=image.dtype)


def _same_outputs(first: Any, second: Any) -> bool:
    pairs = list(zip(pytree.tree_leaves(first), pytree.tree_leaves(second)))
    return all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max().clamp(min=1)))
        for a, b in pairs
        if isinstance(a, Tensor) and a.is_floating_point()
    )


class ExportedGraphs(nn.Module):
    """A model's layer-masked graphs captured by ``torch.export``, one per input shape, made at first use.

    Called as ``graphs(image, mask, *args, **kwargs)`` like a traced layer-masked graph, it returns the outputs
    and their output masks (each in the model's output structure). It registers the model's
    submodules, parameters and buffers as its own (the same objects, so ``state_dict`` keys are the model's), and
    forgets its graphs when moved (``.to()``, ``.half()``): the next call captures again on the new device.

    Args:
        model (nn.Module): the model (not modified).
        mask_graph: turns a captured graph into its layer-masked graph (the conversion's rules and options).
        fx_reason (str, optional): why ``torch.fx`` could not trace the model, reported with export's reason if
            export fails too.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_graph: MaskGraph,
        fx_reason: Optional[str] = None,
        token_blocks: Optional[TokenBlocks] = None,
    ) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        self.__dict__["model"] = model
        self.mask_graph = mask_graph
        self.fx_reason = fx_reason
        self.token_blocks = token_blocks
        self.graphs: Dict[Hashable, Tuple[fx.GraphModule, Any]] = {}

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> nn.Module:
        self.graphs.clear()
        return super()._apply(fn, recurse)

    @staticmethod
    def _structure(leaves: List[Any], spec: Any) -> Hashable:
        parts = [
            (tuple(leaf.shape[1:]), leaf.dtype, str(leaf.device)) if isinstance(leaf, Tensor) else repr(leaf)
            for leaf in leaves
        ]
        return (str(spec), tuple(parts))

    def graph_for(
        self, inputs: Tuple[tuple, Dict[str, Any]], leaves: List[Any], spec: Any
    ) -> Tuple[fx.GraphModule, Any]:
        """The layer-masked graph and output structure for a call with ``inputs`` (``(args, kwargs)``, flattened
        to ``leaves`` and ``spec``), captured if new."""
        args, kwargs = inputs
        structure = self._structure(leaves, spec)
        batch = args[0].shape[0]
        batch = batch if isinstance(batch, int) else "many"
        for key in ((structure, batch), (structure, "many" if batch != 1 else 1)):
            if key in self.graphs:
                return self.graphs[key]
        if torch.compiler.is_exporting():
            raise LayerMaskError(
                "this layer-masked model was captured by torch.export per input shape and has no graph for this "
                "shape yet; call it once on an input of the shape you export (onnx_export.export_masked does)."
            )
        try:
            graph, out_spec, batch_dynamic = export_graph(self.model, args, kwargs, self.token_blocks)
        except Exception as error:  # torch.export raises many types; the reason is reported, not swallowed
            fx = f"torch.fx: {self.fx_reason}; " if self.fx_reason else ""
            raise TracingError(
                f"neither capture path takes {type(self.model).__name__} ({fx}torch.export: {first_line(error)}). "
                "Make the failing submodule one operation with captum_layermask.register_leaf and give it a rule "
                "with register_rule (docs/custom-layers.md)."
            ) from error
        entry = (self.checked_gathering(graph, self.mask_graph(graph), leaves), out_spec)
        self.graphs[(structure, "many" if batch_dynamic and batch != 1 else batch)] = entry
        return entry

    def checked_gathering(self, graph: fx.GraphModule, masked: fx.GraphModule, leaves: List[Any]) -> fx.GraphModule:
        """``masked``, if its token gathering (made size-agnostic for an exported graph,
        :mod:`~captum_layermask.core.gathering`) gives the outputs of attention masking on the capture's inputs
        with a mask that removes whole blocks; else the graph without gathering, with a warning (slower, exact)."""
        if not any(node.target is token_count for node in masked.graph.nodes):
            return masked
        reference = self.mask_graph(graph, gather_tokens=False)
        image = leaves[0]
        if image.ndim == 4:
            mask = _probe_mask(image)
            with torch.no_grad():
                expected = reference(image, mask, *leaves[1:])
                try:
                    gathered = masked(image, mask, *leaves[1:])
                except RuntimeError:  # a size inside the blocks that follows the token count in another way
                    gathered = None
                if gathered is not None and _same_outputs(gathered, expected):
                    return masked
        warnings.warn(
            f"token gathering in {type(self.model).__name__} did not reproduce attention masking on its captured "
            "graph; the blocks mask attention instead (the same outputs, slower).",
            stacklevel=4,
        )
        return reference

    def forward(self, image: Tensor, mask: Optional[Tensor], *args: Any, **kwargs: Any) -> Any:
        inputs = ((image, *args), kwargs)
        leaves, spec = pytree.tree_flatten(inputs)
        graph, out_spec = self.graph_for(inputs, leaves, spec)
        outputs, masks = graph(leaves[0], mask, *leaves[1:])
        return pytree.tree_unflatten(list(outputs), out_spec), pytree.tree_unflatten(list(masks), out_spec)


def model_signature(model: nn.Module) -> inspect.Signature:
    """The model's ``forward`` signature with its first input (the image) required."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise TracingError(f"{type(model).__name__}.forward takes no positional input to mask.")
    image = parameters[0].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD, default=inspect.Parameter.empty)
    return inspect.Signature([image, *parameters[1:]])
