"""Token gathering: transformer blocks run on the visible tokens only (an optimisation; the same outputs).

Under token dropping a removed token is never read by a visible one: attention gives it weight 0, and every
other layer of a transformer block acts per token. Masking attention alone still computes every removed token.
A chain of **token blocks** (:func:`register_token_block`: torchvision's ``EncoderBlock``, timm's ViT ``Block``)
therefore runs on a shorter sequence: before the chain the visible tokens of each sample are gathered, in their
order, into ``(N, M, C)`` with ``M`` the largest visible count of the batch (shorter samples padded with removed
slots, which the attention rules already exclude); after it, the outputs are scattered back to their positions.
A block qualifies only if nothing in it depends on a token's position (no relative position bias, no rotary
embedding): then the order and the number of tokens cannot change what a visible token computes.

This module rewrites the graph that :func:`~captum_layermask.core.convert.add_mask_stream` builds; the rules are
unchanged. A graph captured by ``torch.export`` is specialised to its token count ``T``: inside a region, the
sizes ``T`` of its reshapes become the gathered count, and tensors that enter the region from outside with a
token axis (an attention mask of shape ``(N, 1, T, T)``) are gathered along it too
(:func:`~captum_layermask.core.capture.ExportedGraphs` checks the result against attention masking once per
captured shape). When a layer-masked model is itself exported (ONNX) or compiled, where the sequence length
would depend on the mask, the gather and scatter nodes pass values through and the result masks attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type

import torch
import torch.fx as fx
from torch import Tensor, nn

from .masked import Masked
from .registry import covers

TokenBlocks = Dict[Type[nn.Module], Optional[Callable[[nn.Module], bool]]]
"""Token block classes, each with an optional check of an instance."""

TOKEN_BLOCKS: TokenBlocks = {}
"""The token blocks declared with :func:`register_token_block`."""


def register_token_block(
    module_class: Optional[Type[nn.Module]] = None, *, when: Optional[Callable[[nn.Module], bool]] = None
) -> Any:
    """Declares a module class a token block: a map of ``(N, T, C)`` tokens in which each token's output depends
    on the token itself and on attention over all tokens, never on its position or on the number of tokens.

    Chains of such blocks run on the gathered visible tokens (:mod:`captum_layermask.core.gathering`). Declaring
    a block that does read positions (a relative position bias over ``T x T``, rotary embeddings) would be wrong.

    Args:
        module_class: the block's class (subclasses that do not override ``forward`` count too).
        when: optional check of an instance (e.g. that its attention is of a known kind).

    Returns:
        ``module_class`` (without it, a decorator that registers the class it decorates and returns it);
        :func:`~captum_layermask.unregister` undoes it. One conversion can take token blocks of its own
        instead: ``layer_masked(model, token_blocks={Block: None})``.
    """
    if module_class is None:
        return lambda cls: register_token_block(cls, when=when)
    TOKEN_BLOCKS[module_class] = when
    return module_class


def is_token_block(module: nn.Module, blocks: Optional[TokenBlocks] = None) -> bool:
    """Whether ``module`` is a token block of ``blocks`` (default: the registered ones)."""
    blocks = TOKEN_BLOCKS if blocks is None else blocks
    for cls in type(module).__mro__:
        if cls in blocks:
            check = blocks[cls]
            return covers(cls, module) and (check is None or bool(check(module)))
    return False


@dataclass
class TokenRegion:
    """A chain of token blocks in a traced graph: its one image-dependent input, its nodes, its one output."""

    input: fx.Node
    nodes: Set[fx.Node]
    output: fx.Node


def _is_token_block_path(root: nn.Module, path: str, blocks: Optional[TokenBlocks]) -> bool:
    try:
        module = root.get_submodule(path)
    except AttributeError:  # export records a few nodes under names that are not submodules
        return False
    return is_token_block(module, blocks)


def mark_token_blocks(graph: fx.Graph, root: nn.Module, blocks: Optional[TokenBlocks] = None) -> None:
    """Records in ``node.meta["token_block"]`` the path of the outermost token block each node was traced from
    (``root`` is the traced model, whose submodules the graph module does not all keep)."""
    decided: Dict[str, bool] = {}  # path -> whether it is a token block, decided once per module
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path not in decided:
                decided[path] = _is_token_block_path(root, path, blocks)
            if decided[path]:
                node.meta["token_block"] = path
                break


def _block_region(nodes: List[fx.Node], dependent: Set[fx.Node]) -> Optional[TokenRegion]:
    members = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in members and a in dependent}
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    if len(inputs) != 1 or len(outputs) != 1 or outputs[0] not in dependent:
        return None
    return TokenRegion(next(iter(inputs)), members, outputs[0])


def token_regions(traced: fx.GraphModule, dependent: Set[fx.Node]) -> List[TokenRegion]:
    """The maximal chains of token blocks whose data enters through one tensor and leaves through one."""
    blocks: Dict[str, List[fx.Node]] = {}  # in graph order
    for node in traced.graph.nodes:
        path = node.meta.get("token_block")
        if path is not None and node.op not in ("placeholder", "output", "get_attr"):
            blocks.setdefault(path, []).append(node)
    regions: List[TokenRegion] = []
    for nodes in blocks.values():
        region = _block_region(nodes, dependent)
        if region is None:
            continue
        previous = regions[-1] if regions else None
        if previous is not None and region.input is previous.output and set(previous.output.users) <= region.nodes:
            regions[-1] = TokenRegion(previous.input, previous.nodes | region.nodes, region.output)
        else:
            regions.append(region)
    return regions


def token_order(x: Any) -> Optional[Tensor]:
    """``(N, M)``: per sample, the positions of its visible tokens first (in order), ``M`` the batch's largest
    visible count; None when gathering would not shorten the sequence or cannot apply (computed once per region,
    for its gather and its scatter)."""
    if not isinstance(x, Masked) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    value, mask = x.value, x.mask
    if value.ndim != 3 or mask.ndim != 3 or mask.shape[1] != value.shape[1] or mask.shape[2] != 1:
        return None
    visible = (mask[..., 0] > 0).expand(value.shape[0], value.shape[1])
    kept = max(int(visible.sum(1).max()), 1)
    if kept == value.shape[1]:
        return None
    return torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :kept]


def gather_tokens(x: Any, index: Optional[Tensor]) -> Any:
    """``(N, T, C)`` tokens -> ``(N, M, C)``: each sample's visible tokens first, then removed padding slots."""
    if index is None:
        return x
    value = x.value.gather(1, index[..., None].expand(-1, -1, x.value.shape[2]))
    visible = (x.mask[..., 0] > 0).expand(x.value.shape[0], x.value.shape[1]).gather(1, index)
    return Masked(value, visible[..., None].to(x.mask.dtype))


def scatter_tokens(out: Any, index: Optional[Tensor], x: Any) -> Any:
    """The inverse of :func:`gather_tokens` for a region's output ``out``, given the region's input ``x``: each
    token back at its position; positions of removed tokens hold 0 and are removed."""
    if index is None:
        return out
    if not isinstance(out, Masked) or out.value.ndim != 3:
        raise RuntimeError("a token block returned something other than (N, T, C) tokens.")
    batch, tokens, channels = out.value.shape[0], x.value.shape[1], out.value.shape[2]
    value = out.value.new_zeros(batch, tokens, channels).scatter_(
        1, index[..., None].expand(-1, -1, channels), out.value
    )
    mask = out.mask.expand(batch, index.shape[1], 1)
    full = mask.new_zeros(batch, tokens, 1).scatter_(1, index[..., None], mask)
    return Masked(value, full)


def token_count(x: Any) -> int:
    """The number of tokens of ``(N, T, C)`` tokens (masked or not)."""
    return (x.value if isinstance(x, Masked) else x).shape[1]


def gather_side(side: Tensor, index: Optional[Tensor], dims: Tuple[int, ...]) -> Tensor:
    """A tensor that enters a region from outside (e.g. an attention mask ``(N or 1, heads, T, T)``), gathered
    along its token axes ``dims`` as :func:`gather_tokens` gathers the tokens."""
    if index is None:
        return side
    side = side.expand(index.shape[0], *side.shape[1:])
    for dim in dims:
        shape = [index.shape[0]] + [1] * (side.ndim - 1)
        shape[dim] = index.shape[1]
        sizes = list(side.shape)
        sizes[dim] = index.shape[1]
        side = side.gather(dim, index.view(shape).expand(sizes))
    return side


_SIZED = {"view", "reshape", "expand"}  # methods whose size arguments can hold a captured token count


def _static_tokens(region: TokenRegion) -> Optional[int]:
    """The token count that an exported graph was specialised to, None for a traced (size-agnostic) graph."""
    value = region.input.meta.get("val")
    if value is None or value.ndim != 3 or not isinstance(value.shape[1], int):
        return None
    return value.shape[1]


def _side_inputs(region: TokenRegion, tokens: int) -> Optional[Dict[fx.Node, Tuple[int, ...]]]:
    """Tensors computed outside an exported region and read inside it, with their axes of size ``tokens``;
    None if one of them cannot be gathered (its first axis is not the batch)."""
    sides: Dict[fx.Node, Tuple[int, ...]] = {}
    for node in region.nodes:
        for source in node.all_input_nodes:
            value = source.meta.get("val")
            if source in region.nodes or source is region.input or source.op == "get_attr":
                continue
            if not isinstance(value, Tensor) or value.ndim < 2:
                continue
            dims = tuple(d for d in range(1, value.ndim) if value.shape[d] == tokens)
            if dims and isinstance(value.shape[0], int) and value.shape[0] != 1:
                return None
            if dims:
                sides[source] = dims
    return sides


def _follow_token_count(
    graph: fx.Graph,
    region: TokenRegion,
    env: Dict[fx.Node, Any],
    gathered: fx.Node,
    index: fx.Node,
    tokens: int,
    sides: Dict[fx.Node, Tuple[int, ...]],
) -> None:
    """Makes an exported region size-agnostic: its reshapes take the gathered count, its ``sides`` (from
    :func:`_side_inputs`) are gathered."""
    with graph.inserting_after(gathered):
        count = graph.call_function(token_count, (gathered,))
    members = {env[node] for node in region.nodes}
    for source, dims in sides.items():
        reader = next(node for node in graph.nodes if node in members and env[source] in node.all_input_nodes)
        with graph.inserting_before(reader):
            side = graph.call_function(gather_side, (env[source], index, dims))
        for node in members:
            node.replace_input_with(env[source], side)
    for node in region.nodes:
        if node.op == "call_method" and node.target in _SIZED and len(env[node].args) == 2:
            masked = env[node]
            masked.args = (masked.args[0], _token_sizes(masked.args[1], tokens, count))


def _token_sizes(sizes: Any, tokens: int, count: fx.Node) -> Any:
    """A size list with its token axis (the first size equal to the captured count after the batch) made the
    gathered ``count``; other sizes that happen to equal it (a head dimension) are left."""
    if not isinstance(sizes, (list, tuple)):
        return sizes
    for axis, size in enumerate(sizes[1:], start=1):
        if isinstance(size, int) and size == tokens:
            return type(sizes)([*sizes[:axis], count, *sizes[axis + 1 :]])
    return sizes


def insert_gathering(graph: fx.Graph, regions: List[TokenRegion], env: Dict[fx.Node, fx.Node]) -> None:
    """Puts a gather before and a scatter after each region in the masked ``graph`` (``env``: traced node ->
    masked node)."""
    for region in regions:
        tokens = _static_tokens(region)
        sides = _side_inputs(region, tokens) if tokens is not None else {}
        if sides is None:
            continue
        source, result = env[region.input], env[region.output]
        members = {env[node] for node in region.nodes}
        first = next(node for node in graph.nodes if node in members)
        with graph.inserting_before(first):
            index = graph.call_function(token_order, (source,))
            gathered = graph.call_function(gather_tokens, (source, index))
        for node in members:
            node.replace_input_with(source, gathered)
        if tokens is not None:
            _follow_token_count(graph, region, env, gathered, index, tokens, sides)
        with graph.inserting_after(result):
            scattered = graph.call_function(scatter_tokens, (result, index, source))
        for user in list(result.users):
            if user not in members and user is not scattered:
                user.replace_input_with(result, scattered)
