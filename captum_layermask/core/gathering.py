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
unchanged. Under ``torch.export``/``torch.compile`` (where the sequence length would depend on the mask) the
gather and scatter nodes pass values through, so the exported graph masks attention instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Type

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


def mark_token_blocks(graph: fx.Graph, root: nn.Module, blocks: Optional[TokenBlocks] = None) -> None:
    """Records in ``node.meta["token_block"]`` the path of the outermost token block each node was traced from
    (``root`` is the traced model, whose submodules the graph module does not all keep)."""
    decided: Dict[str, bool] = {}  # path -> whether it is a token block, decided once per module
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path not in decided:
                decided[path] = is_token_block(root.get_submodule(path), blocks)
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


def insert_gathering(graph: fx.Graph, regions: List[TokenRegion], env: Dict[fx.Node, fx.Node]) -> None:
    """Puts a gather before and a scatter after each region in the masked ``graph`` (``env``: traced node ->
    masked node)."""
    for region in regions:
        source, result = env[region.input], env[region.output]
        members = {env[node] for node in region.nodes}
        first = next(node for node in graph.nodes if node in members)
        with graph.inserting_before(first):
            index = graph.call_function(token_order, (source,))
            gathered = graph.call_function(gather_tokens, (source, index))
        for node in members:
            node.replace_input_with(source, gathered)
        with graph.inserting_after(result):
            scattered = graph.call_function(scatter_tokens, (result, index, source))
        for user in list(result.users):
            if user not in members and user is not scattered:
                user.replace_input_with(result, scattered)
