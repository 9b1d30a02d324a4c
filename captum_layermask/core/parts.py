"""Conversion by parts: layer masking for models that neither capture path takes whole (torchvision's detectors).

A detector's forward mixes image-dependent layers (backbone, FPN, heads, RoI pooling) with data-dependent Python
(anchors, box decoding, top-k, NMS) that neither ``torch.fx`` nor ``torch.export`` captures. Conversion by parts
converts the layers and leaves the Python as the model wrote it:

1. the model is copied structurally (modules along the converted paths are shallow copies, parameters and
   buffers shared; the model itself is unchanged);
2. every submodule on the image's path becomes a *part*: one whose class has a masking rule runs that rule, one
   that ``torch.fx`` traces becomes a layer-masked graph (:func:`~captum_layermask.add_mask_stream`), any other
   that holds parameters is split into its children; modules without parameters (anchor generators, box coders)
   run as written;
3. a call carries the masks between parts in a :class:`MaskCarrier`: each tensor a part returns is registered
   with its mask (its removed cells set to the part's *fill*), and each part looks up the masks of the tensors
   it receives. Code between parts passes tensors on (lists, dicts, views of the same memory keep them found).

A part that receives, as its first input, a tensor no part produced raises :class:`LayerMaskError`: that tensor
was computed by code outside the parts, so its mask is unknown, and guessing could give a wrong answer.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .errors import LayerMaskError, MaskShapeError, TracingError, UnsupportedLayerError
from .masked import Masked, align_rank, format_mask, is_masked, map_leaves, map_masked
from .model import _decode_mask, add_inner_prefix, strip_inner_prefix
from .registry import RuleRegistry

Fill = Callable[[Tensor, Tensor], Tensor]
"""``fill(value, mask) -> tensor``: what a part's output holds in its removed cells (``mask`` is 0 there) for the
code that reads it after the part. The default is 0, the value of a layer-masked model's removed outputs."""


def zero_fill(value: Tensor, mask: Tensor) -> Tensor:
    """Removed cells hold 0 (the output rule of a layer-masked model)."""
    return torch.where(align_rank(mask, value.ndim) > 0, value, 0)


def lowest_fill(value: Tensor, mask: Tensor) -> Tensor:
    """Removed cells hold ``-inf``: a logit that no visible pixel reaches scores probability 0 (no candidate)."""
    return torch.where(align_rank(mask, value.ndim) > 0, value, float("-inf"))


def _key(tensor: Tensor) -> Tuple[Any, ...]:
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)


class MaskCarrier:
    """The masks of the tensors that the parts of one call have produced.

    A tensor is found again by its memory and layout (pointer, shape, strides), so that the model's Python may
    pass it through lists and dicts, or take an identical view of it; the carrier keeps every registered tensor
    alive until the call ends, so no other tensor can reuse its memory meanwhile.
    """

    def __init__(self) -> None:
        self._masks: Dict[Tuple[Any, ...], Tuple[Tensor, Tensor]] = {}

    def register(self, tensor: Tensor, mask: Tensor) -> Tensor:
        """Records ``mask`` (broadcastable to ``tensor``, 1 = visible) as the mask of ``tensor``; returns it."""
        self._masks[_key(tensor)] = (tensor, mask)
        return tensor

    def find(self, tensor: Tensor) -> Optional[Tensor]:
        """The mask registered for ``tensor``, or None."""
        entry = self._masks.get(_key(tensor))
        return None if entry is None else entry[1]

    def masked(self, tree: Any, clear: bool = True) -> Any:
        """Replaces each registered tensor of a nested list/tuple/dict by a :class:`Masked`, its removed cells set
        to 0 (so that the rules may mask by multiplication) unless ``clear`` is False (a layer-masked graph clears
        them itself)."""

        def pair(leaf: Any) -> Any:
            if not isinstance(leaf, Tensor):
                return leaf
            mask = self.find(leaf)
            if mask is None:
                return leaf
            return Masked(zero_fill(leaf, mask) if clear else leaf, mask)

        return map_leaves(tree, pair)

    def release(self, tree: Any, fill: Fill = zero_fill) -> Any:
        """Replaces each :class:`Masked` of a nested output by its value, filled in removed cells, and
        registers it with its mask."""
        return map_masked(tree, lambda out: self.register(fill(out.value, out.mask), out.mask))


_CARRIER: contextvars.ContextVar[Optional[MaskCarrier]] = contextvars.ContextVar("layer_mask_carrier", default=None)


@contextlib.contextmanager
def carrying(carrier: MaskCarrier) -> Iterator[MaskCarrier]:
    """Makes ``carrier`` the one the parts of a converted model read and write, for the ``with`` block."""
    token = _CARRIER.set(carrier)
    try:
        yield carrier
    finally:
        _CARRIER.reset(token)


def carry(masked: Masked, fill: Fill = zero_fill) -> Tensor:
    """For a part rule that returns a tensor inside a structure of the model's own (e.g. torchvision's
    ``ImageList``): the value of ``masked``, filled and registered with its mask in the current call.

    Raises:
        LayerMaskError: outside a call of a model converted by parts.
    """
    carrier = _CARRIER.get()
    if carrier is None:
        raise LayerMaskError("carry() is for part rules, called inside a model converted by parts.")
    return carrier.release(masked, fill)


@dataclass
class Part:
    """How one submodule of a model converted by parts runs: by its masking rule, or as a layer-masked graph.

    Attributes:
        path: the submodule's name in the model (``"rpn.head.conv"``).
        module: the model's own submodule (outside a masked call, the part runs it as it is; a rule receives it).
        graph: the layer-masked graph (``(value, mask, *rest) -> (output, output_mask)``), or None for a rule.
        registry: the conversion's rules (for a part that runs by its rule).
        fill: what the part's removed output cells hold for the code after it.
    """

    path: str
    module: nn.Module
    graph: Optional[fx.GraphModule]
    registry: RuleRegistry
    fill: Fill

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        carrier = _CARRIER.get()
        if carrier is None:  # called outside a masked call: the module as it is
            return self.module(*args, **kwargs)
        args, kwargs = carrier.masked((args, kwargs), clear=self.graph is None)
        first = args[0] if args else None
        if not (isinstance(first, Masked) if self.graph is not None else is_masked((args, kwargs))):
            raise LayerMaskError(
                f"the part '{self.path}' received a tensor that no converted part produced, so its mask is "
                "unknown; convert the module that computes it as one part (register a rule for its class)."
            )
        if self.graph is None:
            return carrier.release(self.registry.apply(self.module, *args, **kwargs), self.fill)
        rest = args[1:]
        if is_masked((rest, kwargs)):
            raise LayerMaskError(
                f"the part '{self.path}' receives several image-dependent inputs; a traced part takes one (the "
                "first): register a rule for its class."
            )
        output, output_mask = self.graph(first.value, first.mask, *rest, **kwargs)
        return carrier.release(_pair_outputs(output, output_mask), self.fill)


def _pair_outputs(output: Any, output_mask: Any) -> Any:
    """The output of a layer-masked graph with each tensor paired with its output mask, in the output's
    structure."""
    if isinstance(output, Tensor):
        return Masked(output, output_mask.to(output.dtype))
    if isinstance(output, (list, tuple)):
        items = [_pair_outputs(value, mask) for value, mask in zip(output, output_mask)]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, dict):
        items = {key: _pair_outputs(value, output_mask[key]) for key, value in output.items()}
        return items if type(output) is dict else type(output)(**items)
    return output


def convert_parts(
    model: nn.Module,
    convert: Convert,
    registry: RuleRegistry,
    fills: Optional[Mapping[str, Fill]] = None,
) -> Tuple[nn.Module, List[Part]]:
    """Copies ``model`` structurally with each submodule on the image's path replaced by a part.

    Args:
        model (nn.Module): the model; not modified (its parameters and buffers are shared with the copy).
        convert: ``convert(module) -> graph``: a submodule's layer-masked graph; raises
            :class:`~captum_layermask.TracingError` or :class:`~captum_layermask.UnsupportedLayerError` for one
            that has to be split into its children.
        registry: the rules; a submodule whose class has one runs it.
        fills: ``{path: fill}`` for parts whose removed outputs must hold something other than 0 (e.g.
            :func:`lowest_fill` for scores).

    Returns:
        The copy, and its parts in the order they were found.

    Raises:
        UnsupportedLayerError: for a module with parameters of its own that neither traces nor has a rule.
    """
    fills = dict(fills or {})
    parts: List[Part] = []
    copied = _convert_module(model, "", convert, registry, fills, parts)
    unused = sorted(set(fills) - {part.path for part in parts})
    if unused:
        raise LayerMaskError(f"fills name no part of {type(model).__name__}: {unused}.")
    return copied, parts


def _convert_module(
    module: nn.Module,
    path: str,
    convert: Convert,
    registry: RuleRegistry,
    fills: Dict[str, Fill],
    parts: List[Part],
) -> nn.Module:
    fill = fills.get(path, zero_fill)
    if path and registry.find(module) is not None:
        return _with_part(module, Part(path, module, None, registry, fill), parts)
    if not any(True for _ in module.parameters()):
        return module  # anchors, box coders, NMS: they read shapes and coordinates, never activations
    reason: Any = "the model's own forward uses them between its parts"
    if path:
        try:
            return _with_part(module, Part(path, module, convert(module), registry, fill), parts)
        except (TracingError, UnsupportedLayerError) as error:
            reason = error
    if any(True for _ in module.parameters(recurse=False)):
        raise UnsupportedLayerError(
            f"'{path or type(module).__name__}' ({type(module).__qualname__}) holds parameters of its own, but "
            f"neither traces nor has a masking rule ({reason}); register a rule for its class."
        )
    copied = _shallow_copy(module)
    for name, child in module.named_children():
        prefix = f"{path}.{name}" if path else name
        copied._modules[name] = _convert_module(child, prefix, convert, registry, fills, parts)
    return copied


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of the module object with a table of children of its own (parameters and buffers shared), so that
    replacing a child in the copy leaves the original as it was."""
    copied = copy.copy(module)
    copied._modules = dict(module._modules)
    return copied


def _with_part(module: nn.Module, part: Part, parts: List[Part]) -> nn.Module:
    """A shallow copy of ``module`` (same class, children and state-dict keys) whose forward runs ``part``."""
    copied = _shallow_copy(module)
    copied.forward = part
    parts.append(part)
    return copied


ImageMasks = Union[Tensor, List[Tensor]]


class LayerMaskedParts(nn.Module):
    """A model converted by parts (:func:`convert_parts`), called as the model is, with the masks beside the
    images: ``masked(images, masks)``.

    Built by :func:`~captum_layermask.layer_masked` for the model classes registered with
    :func:`register_part_model` (torchvision's detectors) and for ``capture="parts"``. Its ``state_dict`` has the
    model's keys; it shares the model's parameters; it pickles by storing the model and the options.
    """

    inner_prefix = "model."
    kept_attributes: Tuple[str, ...] = ()
    """Attributes besides the options that a pickled copy keeps (a subclass's settings)."""

    def __init__(self, model: nn.Module, source: nn.Module, options: Mapping[str, Any], parts: List[Part]) -> None:
        super().__init__()
        self.model = model
        self.__dict__["_source"] = source
        self.options = dict(options)
        self.parts = parts
        self.training = source.training
        self.register_state_dict_post_hook(strip_inner_prefix)
        self.register_load_state_dict_pre_hook(add_inner_prefix)

    def forward(self, images: Any, mask: Optional[ImageMasks] = None, **kwargs: Any) -> Any:
        """Runs the model on the visible pixels of ``images``.

        Args:
            images: what the model takes: an image batch ``(N, C, H, W)`` or a list of ``(C, H, W)`` images.
            mask: 1 (True) for visible pixels, 0 for removed ones: for a batch, ``(H, W)``, ``(N, H, W)`` or
                ``(N, 1, H, W)``; for a list, a list of ``(H, W)`` or ``(1, H, W)`` masks (or one batch of
                masks when the images have one size). If None, the installed mask decoders are asked (pixels set
                to a :class:`~captum_layermask.LayerMask` baseline are removed); without any mask the output is
                exactly the model's.
            **kwargs: the model's further inputs, passed on.

        Raises:
            MaskShapeError: for masks that do not fit the images or are not binary.
            LayerMaskError: in training mode.
        """
        if self.training:
            raise LayerMaskError(f"{type(self).__name__} runs in eval mode only; call .eval() first.")
        masks = image_masks(images, mask)
        if masks is None:
            return self.model(images, **kwargs)
        carrier = MaskCarrier()
        if isinstance(images, Tensor):
            carrier.register(images, masks)
        else:
            for image, image_mask in zip(images, masks):
                carrier.register(image, image_mask)
        with carrying(carrier):
            output = self.model(images, **kwargs)
        return self.finish(output, images, masks)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> LayerMaskedParts:
        """``.to()``, ``.double()``, ...: the parts' graphs too (a graph may hold its own references to buffers
        that it reads directly, e.g. a traced ``FrozenBatchNorm2d``'s)."""
        super()._apply(fn, recurse)
        for part in self.parts:
            if part.graph is not None:
                part.graph._apply(fn, recurse)
        return self

    def finish(self, output: Any, images: Any, masks: ImageMasks) -> Any:
        """What the masked model returns for the model's output on masked images (a subclass's output rule)."""
        return output

    def extra_repr(self) -> str:
        return f"parts={len(self.parts)}, padding={self.options['padding']!r}"

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Pickles (and deep-copies) as the model and the options: loading converts again."""
        kept = {name: getattr(self, name) for name in self.kept_attributes}
        return (_rebuild_parts, (self._source, self.options, self.state_dict(), self.training, kept))


def image_masks(images: Any, mask: Optional[ImageMasks]) -> Optional[ImageMasks]:
    """The masks of ``images`` (a batch ``(N, 1, H, W)``, or a list of ``(1, H, W)``), validated, or decoded
    from the images' values when ``mask`` is None; None when no image has a mask.

    Raises:
        MaskShapeError: for masks that do not fit the images or are not binary.
    """
    if isinstance(images, Tensor):
        if mask is None:
            mask = _decode_mask(images, ())
        return None if mask is None else format_mask(mask, images).expand(images.shape[0], -1, -1, -1)
    if not isinstance(images, (list, tuple)) or not all(isinstance(image, Tensor) for image in images):
        raise MaskShapeError(f"images are a batch (N, C, H, W) or a list of (C, H, W) tensors, got {type(images)}.")
    if mask is None:
        decoded = [_decode_mask(image[None], ()) for image in images]
        if all(item is None for item in decoded):
            return None
        mask = [torch.ones(image.shape[-2:]) if item is None else item for image, item in zip(images, decoded)]
    if len(mask) != len(images):
        raise MaskShapeError(f"{len(mask)} masks for {len(images)} images; give one mask per image.")
    return [format_mask(item, image[None])[0] for image, item in zip(images, mask)]


Convert = Callable[[nn.Module], fx.GraphModule]
PartModelBuilder = Callable[[nn.Module, Mapping[str, Any], Convert, RuleRegistry], nn.Module]
PART_MODELS: Dict[type, PartModelBuilder] = {}


def register_part_model(model_class: type, build: Optional[PartModelBuilder] = None) -> Any:
    """Makes :func:`~captum_layermask.layer_masked` convert models of ``model_class`` (and its subclasses) by parts.

    Args:
        model_class: e.g. torchvision's ``GeneralizedRCNN``.
        build: ``build(model, options, convert, registry) -> module``: the masked model, from the conversion's
            options, ``convert(submodule) -> graph`` (a submodule's layer-masked graph) and rules; usually a
            :class:`LayerMaskedParts` subclass built with :func:`convert_parts`. Without it, a decorator.

    Returns:
        ``build``; :func:`~captum_layermask.unregister` undoes it.
    """
    if build is None:
        return lambda function: register_part_model(model_class, function)
    PART_MODELS[model_class] = build
    return build


def part_model_builder(model: nn.Module) -> Optional[PartModelBuilder]:
    """The builder registered for the model's class (or the nearest base class), or None."""
    for base in type(model).__mro__:
        if base in PART_MODELS:
            return PART_MODELS[base]
    return None


def build_parts(model: nn.Module, options: Mapping[str, Any], convert: Convert, registry: RuleRegistry) -> nn.Module:
    """The builder of ``layer_masked(model, capture="parts")`` for a model of no registered class: every removed
    output cell of every part holds 0 for the code between parts."""
    copied, parts = convert_parts(model, convert, registry)
    return LayerMaskedParts(copied, model, options, parts)


def _rebuild_parts(
    source: nn.Module, options: Mapping[str, Any], state: Mapping[str, Any], training: bool, kept: Mapping[str, Any]
) -> nn.Module:
    """How a model converted by parts unpickles: converted again (as a layer-masked model), then its settings."""
    from .convert import _rebuild

    masked = _rebuild(source, options, state, training)
    for name, value in kept.items():
        setattr(masked, name, value)
    return masked
