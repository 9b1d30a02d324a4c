"""ATen operations as the torch functions and tensor methods that the masking rules are registered for.

A graph captured by ``torch.export`` records ATen operations (``aten.conv2d.default``, ``aten.view.default``);
``torch.fx`` records what the model's code called (``F.conv2d``, ``Tensor.view``). :func:`torch_level_graph`
rewrites the image-dependent nodes of an exported graph into the second vocabulary, argument order included,
so that one rule per operation serves both capture paths (there is no second copy of any rule). An ATen
operation without an entry here keeps its ATen name, and the conversion names it if the image reaches it.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

Arguments = Tuple[tuple, dict]
Translation = Callable[[tuple, dict], Tuple[str, Any, tuple, dict]]


def _function(target: Callable[..., Any], arguments: Optional[Callable[..., Arguments]] = None) -> Translation:
    def translate(args: tuple, kwargs: dict) -> Tuple[str, Any, tuple, dict]:
        return ("call_function", target, *(arguments(*args, **kwargs) if arguments else (args, kwargs)))

    return translate


def _method(name: str, arguments: Optional[Callable[..., Arguments]] = None) -> Translation:
    def translate(args: tuple, kwargs: dict) -> Tuple[str, Any, tuple, dict]:
        return ("call_method", name, *(arguments(*args, **kwargs) if arguments else (args, kwargs)))

    return translate


def _first(count: int) -> Callable[..., Arguments]:
    """The first ``count`` arguments (ATen's trailing ``cudnn_enable`` flags have no torch counterpart)."""
    return lambda *args, **kwargs: (args[:count], {k: v for k, v in kwargs.items() if k != "cudnn_enable"})


def _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return (x, running_mean, running_var, weight, bias, training, momentum, eps), {}


def _pooling(x, kernel_size, stride=(), *rest, **kwargs):
    return (x, kernel_size, stride or None, *rest), kwargs  # ATen's empty stride means "the kernel size"


def _sum_with_alpha(x, y, alpha=1):
    return ((x, y), {}) if alpha == 1 else ((x, y), {"alpha": alpha})


def _select(x, dim, index):
    return (x, (slice(None),) * dim + (index,)), {}


def _slice(x, dim=0, start=None, end=None, step=1):
    return (x, (slice(None),) * dim + (slice(start, end, step),)), {}


def _constant_pad(x, pad, value=0.0):
    return (x, pad, "constant", value), {}


def _upsample(mode: str) -> Callable[..., Arguments]:
    def arguments(x, output_size, *rest, **kwargs):
        scale = kwargs.pop("scale_factors", rest[-1] if rest else None)
        align = rest[0] if len(rest) == 2 else kwargs.pop("align_corners", None)
        size = None if scale is not None else output_size
        return (x,), {"size": size, "scale_factor": scale, "mode": mode, "align_corners": align}

    return arguments


def _softmax(x, dim, dtype_or_half=None):
    return (x,), {"dim": dim} if not isinstance(dtype_or_half, torch.dtype) else {"dim": dim, "dtype": dtype_or_half}


def _to(x, *args, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k in ("dtype", "device", "non_blocking", "copy", "memory_format")}
    return (x, *[a for a in args if isinstance(a, (torch.dtype, torch.device, str))]), kwargs


def _einsum(equation, operands, path=None):
    return (equation, *operands), {}


def _reduction_keepdim(x, dim=None, keepdim=False, *, dtype=None):
    return ((x,) if dim is None else (x, dim)), ({"keepdim": keepdim} | ({"dtype": dtype} if dtype else {}))


def _with_correction(x, dim=None, *, correction=None, keepdim=False):
    return (x,), {"dim": dim, "correction": 1 if correction is None else correction, "keepdim": keepdim}


def _gelu(x, approximate="none"):
    return (x,), {"approximate": approximate}


_UNARY = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
    "neg": torch.neg,
    "erf": torch.erf,
    "reciprocal": torch.reciprocal,
    "square": torch.square,
    "silu": F.silu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "log1p": torch.log1p,
}

ATEN_OPERATIONS: Dict[str, Translation] = {
    "aten.conv1d.default": _function(F.conv1d),
    "aten.conv2d.default": _function(F.conv2d),
    "aten.conv2d.padding": _function(F.conv2d),
    "aten.conv_transpose2d.input": _function(F.conv_transpose2d),
    "aten.linear.default": _function(F.linear),
    "aten.layer_norm.default": _function(F.layer_norm, _first(5)),
    "aten.rms_norm.default": _function(F.rms_norm),
    "aten.group_norm.default": _function(F.group_norm, _first(5)),
    "aten.batch_norm.default": _function(F.batch_norm, _batch_norm),
    "aten.scaled_dot_product_attention.default": _function(F.scaled_dot_product_attention),
    "aten.softmax.int": _function(torch.softmax, _softmax),
    "aten._softmax.default": _function(torch.softmax, _softmax),
    "aten.matmul.default": _function(torch.matmul),
    "aten.bmm.default": _function(torch.bmm),
    "aten.einsum.default": _function(torch.einsum, _einsum),
    "aten.max_pool2d.default": _function(F.max_pool2d, _pooling),
    "aten.avg_pool2d.default": _function(F.avg_pool2d, _pooling),
    "aten.adaptive_avg_pool1d.default": _function(F.adaptive_avg_pool1d),
    "aten.adaptive_avg_pool2d.default": _function(F.adaptive_avg_pool2d),
    "aten.mean.dim": _function(torch.mean, _reduction_keepdim),
    "aten.mean.default": _function(torch.mean, _reduction_keepdim),
    "aten.sum.dim_IntList": _function(torch.sum, _reduction_keepdim),
    "aten.max.dim": _function(torch.max),
    "aten.min.dim": _function(torch.min),
    "aten.amax.default": _function(torch.amax, _reduction_keepdim),
    "aten.amin.default": _function(torch.amin, _reduction_keepdim),
    "aten.var.correction": _function(torch.var, _with_correction),
    "aten.std.correction": _function(torch.std, _with_correction),
    "aten.linalg_vector_norm.default": _function(torch.linalg.vector_norm),
    "aten.pad.default": _function(F.pad),
    "aten.constant_pad_nd.default": _function(F.pad, _constant_pad),
    "aten.upsample_nearest2d.vec": _function(F.interpolate, _upsample("nearest")),
    "aten.upsample_bilinear2d.vec": _function(F.interpolate, _upsample("bilinear")),
    "aten.upsample_bicubic2d.vec": _function(F.interpolate, _upsample("bicubic")),
    "aten.add.Tensor": _function(operator.add, _sum_with_alpha),
    "aten.add_.Tensor": _function(operator.add, _sum_with_alpha),
    "aten.add.Scalar": _function(operator.add, _sum_with_alpha),
    "aten.sub.Tensor": _function(operator.sub, _sum_with_alpha),
    "aten.sub.Scalar": _function(operator.sub, _sum_with_alpha),
    "aten.rsub.Scalar": _function(operator.sub, lambda x, y, alpha=1: ((y, x), {})),
    "aten.mul.Tensor": _function(operator.mul),
    "aten.mul_.Tensor": _function(operator.mul),
    "aten.mul.Scalar": _function(operator.mul),
    "aten.div.Tensor": _function(operator.truediv),
    "aten.div.Scalar": _function(operator.truediv),
    "aten.div.Tensor_mode": _function(torch.div),
    "aten.pow.Tensor_Scalar": _function(torch.pow),
    "aten.pow.Tensor_Tensor": _function(torch.pow),
    "aten.clamp.default": _function(torch.clamp),
    "aten.clamp.Tensor": _function(torch.clamp),
    "aten.clamp_min.default": _function(torch.clamp, lambda x, low: ((x,), {"min": low})),
    "aten.clamp_max.default": _function(torch.clamp, lambda x, high: ((x,), {"max": high})),
    "aten.where.self": _function(torch.where),
    "aten.maximum.default": _function(torch.maximum),
    "aten.minimum.default": _function(torch.minimum),
    "aten.gelu.default": _function(F.gelu, _gelu),
    "aten.gelu_.default": _function(F.gelu, _gelu),
    "aten.dropout.default": _function(F.dropout),
    "aten.dropout_.default": _function(F.dropout),
    "aten.feature_dropout.default": _function(F.dropout2d),
    "aten.cat.default": _function(torch.cat),
    "aten.concat.default": _function(torch.cat),
    "aten.stack.default": _function(torch.stack),
    "aten.split.Tensor": _function(torch.split),
    "aten.split_with_sizes.default": _function(torch.split),
    "aten.chunk.default": _function(torch.chunk),
    "aten.unbind.int": _function(torch.unbind),
    "aten.roll.default": _function(torch.roll),
    "aten.flatten.using_ints": _function(torch.flatten),
    "aten.unflatten.int": _function(torch.unflatten),
    "aten.select.int": _function(operator.getitem, _select),
    "aten.slice.Tensor": _function(operator.getitem, _slice),
    "aten.view.default": _method("view"),
    "aten._unsafe_view.default": _method("view"),
    "aten.reshape.default": _method("reshape"),
    "aten.reshape_as.default": _method("reshape_as"),
    "aten.view_as.default": _method("view_as"),
    "aten.permute.default": _method("permute"),
    "aten.transpose.int": _method("transpose"),
    "aten.unsqueeze.default": _method("unsqueeze"),
    "aten.squeeze.dim": _method("squeeze"),
    "aten.squeeze.dims": _method("squeeze"),
    "aten.squeeze.default": _method("squeeze"),
    "aten.expand.default": _method("expand"),
    "aten.expand_as.default": _method("expand_as"),
    "aten.repeat.default": _method("repeat"),
    "aten.contiguous.default": _method("contiguous"),
    "aten.clone.default": _method("clone"),
    "aten.detach.default": _method("detach"),
    "aten.alias.default": _method("view_as", lambda x: ((x, x), {})),
    "aten.to.dtype": _method("to", _to),
    "aten.to.dtype_layout": _method("to", _to),
    "aten.to.device": _method("to", _to),
    "aten._to_copy.default": _method("to", _to),
    "aten.sym_size.int": _method("size"),
    **{f"aten.{name}.default": _function(target) for name, target in _UNARY.items()},
    **{f"aten.{name}_.default": _function(target) for name, target in _UNARY.items()},
}
"""``{ATen overload name: translation}``: how each ATen operation is written as the torch call its rule is
registered for. A translation returns ``(fx op, target, args, kwargs)``."""

_DROPPED = {"aten._assert_tensor_metadata.default"}  # checks on dtypes only; they return nothing


def _reachable(graph: fx.Graph, image: fx.Node) -> set:
    reached = {image}
    for node in graph.nodes:
        if any(arg in reached for arg in node.all_input_nodes):
            reached.add(node)
    return reached


def torch_level_graph(exported: fx.GraphModule) -> fx.GraphModule:
    """Rewrites the nodes of an exported graph that the image (its first placeholder) reaches into torch functions
    and methods.

    Args:
        exported (fx.GraphModule): ``torch.export.export(...).module()``.

    Returns:
        The rewritten graph module (sharing the exported module's parameters), whose output is the flat list of
        the model's output tensors.
    """
    image = next(node for node in exported.graph.nodes if node.op == "placeholder")
    reached = _reachable(exported.graph, image)
    graph = fx.Graph()
    env: Dict[fx.Node, Any] = {}
    for node in exported.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn" or str(node.target) in _DROPPED:
            continue
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], env.__getitem__))
            continue
        translate = ATEN_OPERATIONS.get(str(node.target)) if node.op == "call_function" else None
        if translate is None or node not in reached:
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        kind, target, args, kwargs = translate(*fx.map_arg((node.args, node.kwargs), env.__getitem__))
        env[node] = graph.create_node(kind, target, args, kwargs, name=node.name)
        env[node].meta = dict(node.meta)
    return fx.GraphModule(exported, graph, type(exported).__name__)
