"""``LayerMaskedModel``: the module that :func:`~captum_layermask.layer_masked` returns.

It checks the call (image, the model's further inputs, the mask), asks the installed mask decoders for a mask
when none is given (the Captum integration installs one that recognises ``LayerMask()`` baselines), and runs
the masked graph. Under ``torch.compile`` these steps run as written (their data-dependent checks break the
graph), so that a compiled model decodes and validates exactly as an eager one.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from .errors import LayerMaskError, MaskShapeError
from .masked import format_mask

MaskDecoder = Callable[[Tensor, Sequence[Any]], Optional[Tensor]]
"""``decoder(x, other_inputs) -> mask or None``: the mask that the values of the inputs encode, if any."""

MASK_DECODERS: OrderedDict[int, MaskDecoder] = OrderedDict()


def register_mask_decoder(decoder: MaskDecoder) -> MaskDecoder:
    """Installs a function that recovers a mask from the inputs of a layer-masked model called without one.

    Perturbation libraries never pass masks to the model: they hand it perturbed inputs. A decoder recognises
    the perturbation (``LayerMask()`` pixels, for Captum) and returns the mask ``(N, 1, H, W)`` it encodes, or
    None. The first decoder that returns a mask wins.

    Args:
        decoder: ``decoder(x, other_inputs)``; ``x`` is the image batch, ``other_inputs`` the model's further
            positional and keyword inputs. It may raise :class:`~captum_layermask.MaskShapeError` for inputs
            that encode a mask it cannot honour.

    Returns:
        ``decoder``, so that it serves as a decorator; :func:`~captum_layermask.unregister` uninstalls it.
    """
    MASK_DECODERS[id(decoder)] = decoder
    return decoder


def _decode_mask(x: Tensor, others: Sequence[Any]) -> Optional[Tensor]:
    for decoder in list(MASK_DECODERS.values()):
        mask = decoder(x, others)
        if mask is not None:
            return mask
    return None


def input_signature(traced: fx.GraphModule) -> inspect.Signature:
    """The model's own inputs (image first) as a signature, from the traced graph's placeholders."""
    parameters = []
    for node in traced.graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target)
        if name.startswith("**"):
            parameters.append(inspect.Parameter(name[2:], inspect.Parameter.VAR_KEYWORD))
        elif name.startswith("*"):
            parameters.append(inspect.Parameter(name[1:], inspect.Parameter.VAR_POSITIONAL))
        else:
            default = node.args[0] if node.args and parameters else inspect.Parameter.empty  # the image: required
            parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    return inspect.Signature(parameters)


def _prepare_call(
    model: LayerMaskedModel, x: Any, args: Tuple[Any, ...], mask: Optional[Tensor], kwargs: Dict[str, Any]
) -> Tuple[Optional[Tensor], Tuple[Any, ...]]:
    """The mask to run with (validated, or decoded) and the model's further inputs.

    Under ``torch.compile`` this runs as written too: its data-dependent checks break the graph, so a compiled
    model validates and decodes exactly as an eager one.
    """
    if not isinstance(x, Tensor):
        raise MaskShapeError(
            f"the first input of a layer-masked model is the image batch (N, C, H, W), got {type(x).__name__}."
        )
    further_required = model.required_inputs - 1
    # One positional argument after the required ones is the mask; a non-tensor there is the model's own
    # optional input (Captum passes additional_forward_args positionally).
    takes_it = model.positional_inputs > model.required_inputs and bool(args) and not isinstance(args[-1], Tensor)
    if mask is None and len(args) == further_required + 1 and not takes_it:
        *rest, mask = args
        args = tuple(rest)
        if not isinstance(mask, Tensor):
            raise MaskShapeError(
                f"mask must be a torch.Tensor (the positional argument after the model's {model.required_inputs} "
                f"required input(s) is the mask), got {type(mask).__name__}."
            )
    elif mask is not None and len(args) == further_required + 1 and model.positional_inputs == model.required_inputs:
        raise LayerMaskError("the mask is given twice, as the last positional argument and as mask=; pass it once.")
    try:
        model.signature.bind(x, *args, **kwargs)
    except TypeError as error:
        names = ", ".join(model.signature.parameters)
        raise LayerMaskError(f"the call does not fit the model's inputs ({names}) plus mask=: {error}.") from None
    if mask is None:
        mask = _decode_mask(x, (*args, *kwargs.values()))
    if mask is not None:
        mask = format_mask(mask, x)
    return mask, args


def select_output(output: Any, part: Any) -> Any:
    """The ``output=`` part of a model's output: an index of a tuple or list, a key of a dict, or an attribute
    (e.g. a Hugging Face output object's ``logits``); the whole output if ``part`` is None.

    Raises:
        LayerMaskError: if the output has no such part.
    """
    if part is None:
        return output
    if isinstance(output, (tuple, list)) and isinstance(part, int) and -len(output) <= part < len(output):
        return output[part]
    if isinstance(output, Mapping) and part in output:
        return output[part]
    if isinstance(part, str) and not isinstance(output, Mapping) and hasattr(output, part):
        return getattr(output, part)
    available = list(output.keys()) if isinstance(output, Mapping) else None
    described = f"a dict with keys {available}" if available is not None else type(output).__name__
    if isinstance(output, (tuple, list)):
        described = f"a {type(output).__name__} of {len(output)}"
    raise LayerMaskError(
        f"output={part!r} does not name a part of the model's output ({described}); pass an index or key it has."
    )


class LayerMaskedModel(nn.Module):
    """A CNN that runs on the visible pixels of its input only (layer masking, paper section 3).

    Built by :func:`layer_masked`; shares the original model's submodules and parameters, and its
    ``state_dict`` has the original model's keys (one loads into the other). The masked graph is
    ``self.graph_module`` (``print(masked.graph_module.code)`` shows it). It pickles (``torch.save``) by
    storing the original model and the conversion's options: loading converts again, so a custom rule given
    with ``register_rule`` must be registered before loading.
    """

    inner_prefix = "graph_module."

    def __init__(
        self, graph_module: fx.GraphModule, source: nn.Module, options: Mapping[str, Any], signature: inspect.Signature
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.__dict__["_source"] = source  # not a submodule: its modules are registered through graph_module
        self.options = dict(options)
        self.signature = signature
        self.required_inputs = sum(
            p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            for p in signature.parameters.values()
        )
        self.positional_inputs = sum(
            p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in signature.parameters.values()
        )
        self.training = source.training
        graph_module.training = source.training
        self.register_state_dict_post_hook(strip_inner_prefix)
        self.register_load_state_dict_pre_hook(add_inner_prefix)

    def forward(
        self,
        x: Optional[Tensor] = None,
        *args: Any,
        mask: Optional[Tensor] = None,
        return_mask: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Runs the model on the visible pixels of ``x``.

        Args:
            x (Tensor): images, shape ``(N, C, H, W)``: the first positional argument, or the keyword of the
                model's first input (``pixel_values=`` for a Hugging Face model).
            *args: the model's further inputs, passed on unmasked. One positional tensor more than the model
                requires is the mask: ``masked(x, mask)`` for a model that takes only images; a number or other
                non-tensor there is the model's own optional input (as Captum's ``additional_forward_args``
                pass it). Give a model's optional *tensor* inputs by keyword.
            mask (Tensor, optional): 1 (True) for visible pixels, 0 for removed ones; shape ``(H, W)``,
                ``(N, H, W)``, ``(N, 1, H, W)`` or ``(1, 1, H, W)``. Removed pixels have no influence on the
                output, whatever their values. If None, the installed mask decoders are asked (pixels set to a
                :class:`~captum_layermask.LayerMask` baseline by Captum are removed); without any mask the
                output is exactly ``model(x)``.
            return_mask (bool): also return the output mask.
            **kwargs: further keyword inputs of the model.

        Returns:
            The model's output (its ``output=`` part if the conversion named one), same structure, shapes and
            dtypes; outputs that receive nothing from any visible pixel (e.g. the logits of an image whose mask
            is all 0, the cells of a segmentation far inside a removed region) are 0. With ``return_mask=True``,
            ``(output, output_mask)``: the output mask has the output's structure (a dict of masks for a dict
            output), each a bool tensor of its output's rank, broadcastable to it, ``True`` for the cells that
            some visible pixel reaches (docs/masking.md#the-output-mask).

        Raises:
            MaskShapeError: for a mask that does not fit ``x`` or is not binary.
            LayerMaskError: for a call that does not fit the model's inputs, or under ``torch.jit``.
            UnsupportedLayerError: in training mode, for a model with batch normalization or dropout.
        """
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            raise LayerMaskError(_JIT_MESSAGE)
        if x is None:
            x = self._image_by_name(kwargs)
        if torch.compiler.is_exporting():  # no data-dependent checks in an exported graph: the mask is given
            if mask is not None:
                mask = (format_mask(mask, x) > 0).to(x.dtype)  # exported graphs take mask > 0 as visible
        else:
            mask, args = _prepare_call(self, x, args, mask, kwargs)
        output, output_mask = self.graph_module(x, mask, *args, **kwargs)
        part = self.options.get("output")
        if return_mask:
            return select_output(output, part), select_output(output_mask, part)
        return select_output(output, part)

    def _image_by_name(self, kwargs: Dict[str, Any]) -> Any:
        """The image given by the name of the model's first input (``pixel_values=``), taken out of ``kwargs``."""
        name = next(iter(self.signature.parameters))
        if name not in kwargs:
            raise LayerMaskError(f"a layer-masked model takes the image batch first (or as {name}=); none was given.")
        return kwargs.pop(name)

    def __prepare_scriptable__(self) -> nn.Module:
        raise LayerMaskError(_JIT_MESSAGE)

    @property
    def captured_by(self) -> str:
        """How the model became a graph: ``"fx"`` (symbolic tracing, one graph for every input shape) or
        ``"export"`` (``torch.export``, one graph per input shape, made at its first call)."""
        return "fx" if isinstance(self.graph_module, fx.GraphModule) else "export"

    @property
    def padding(self) -> str:
        """The conversion's ``padding`` option."""
        return self.options["padding"]

    def extra_repr(self) -> str:
        output = self.options.get("output")
        selected = "" if output is None else f", output={output!r}"
        return f"padding={self.padding!r}, residual={self.options['residual']!r}{selected}"


_JIT_MESSAGE = (
    "torch.jit cannot trace or script a layer-masked model (its mask stream is Python); use torch.export.export"
    "(masked, (x,), {'mask': mask}) or onnx_export.export_masked for a deployable graph."
)


def strip_inner_prefix(module: nn.Module, state: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook of a wrapper whose ``inner_prefix`` child holds the model: ``graph_module.conv1.weight``
    becomes ``conv1.weight``, the model's own key."""
    inner = prefix + module.inner_prefix
    _rename_keys(state, lambda key: prefix + key[len(inner) :] if key.startswith(inner) else key)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        metadata.pop(inner[:-1], None)
        _rename_keys(metadata, lambda key: prefix + key[len(inner) :] if key.startswith(inner) else key)


def add_inner_prefix(module: nn.Module, state: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: the model's own keys are read into the shared modules under ``inner_prefix``."""
    inner = prefix + module.inner_prefix

    def rename(key: str) -> str:
        outside = not key.startswith(prefix) or key.startswith(inner) or key == prefix
        return key if outside else inner + key[len(prefix) :]

    _rename_keys(state, rename)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        _rename_keys(metadata, rename)


def _rename_keys(table: Dict[str, Any], rename: Callable[[str], str]) -> None:
    """Renames the keys of a dict in place, keeping their order."""
    items = list(table.items())
    table.clear()
    for key, value in items:
        table[rename(key)] = value
