"""``export_masked``: a layer-masked CNN as an ONNX model for stock onnxruntime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnx
import torch
from torch import nn

from captum_layermask import LayerMaskedModel, layer_masked, random_patch_masks
from captum_layermask.files import staged

from .functions import add_neighbor_pad_function, neighbor_pad_translation

SUPPORTED_OPSETS = range(18, 24)
INPUT_NAMES = ("image", "mask")
OUTPUT_NAME = "logits"
MASK_OUTPUT_NAME = "output_mask"


class ExportError(Exception):
    """The model cannot be exported, or the export does not reproduce it; no file was written."""


def verification_masks(batch: int, height: int, width: int, seed: int = 0) -> dict:
    """Masks ``(batch, 1, H, W)`` in float32 that the export is checked with: full, half and 90% removed."""
    generator = torch.Generator().manual_seed(seed)
    half, tenth = (
        random_patch_masks(batch, height, width, 16, keep, generator=generator).float() for keep in (0.5, 0.1)
    )
    return {"full": torch.ones(batch, 1, height, width), "half removed": half, "90% removed": tenth}


def verify(
    path: Path,
    masked: nn.Module,
    input_shape: Sequence[int],
    batch: int,
    rtol: float = 1e-4,
    return_mask: bool = False,
) -> float:
    """Runs the file in onnxruntime against PyTorch; returns the largest relative difference.

    Raises:
        ExportError: if any output differs by more than ``rtol`` relative to the largest output magnitude, or
            (``return_mask``) any cell of the output mask differs.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(batch, *input_shape[1:], generator=generator)
    worst = 0.0
    names = [OUTPUT_NAME, MASK_OUTPUT_NAME] if return_mask else [OUTPUT_NAME]
    for name, mask in verification_masks(batch, *input_shape[2:]).items():
        try:
            got, *got_mask = session.run(names, {"image": image.numpy(), "mask": mask.numpy()})
        except Exception as error:  # onnxruntime's own exception types
            raise ExportError(f"onnxruntime cannot run the export: {str(error).strip().splitlines()[-1]}") from None
        with torch.no_grad():
            expected, expected_mask = masked(image, mask, return_mask=True)
        expected = expected.numpy()
        if got_mask and not np.array_equal(got_mask[0], expected_mask.numpy()):
            raise ExportError(f"onnxruntime's output mask differs from PyTorch's with the {name} mask.")
        difference = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
        if difference > rtol:
            raise ExportError(f"onnxruntime differs from PyTorch by {difference:.2e} (relative) with the {name} mask.")
        worst = max(worst, difference)
    return worst


def export_masked(
    model: nn.Module,
    path: Union[str, Path],
    *,
    input_shape: Sequence[int],
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    verify_batch: Optional[int] = None,
    return_mask: bool = False,
) -> Path:
    """Exports a CNN with layer masking to ONNX, checks it, and verifies it against PyTorch before writing.

    The ONNX graph takes ``image`` (float32, N x C x H x W) and ``mask`` (float32, N x 1 x H x W, 1 = visible)
    and returns ``logits`` (and ``output_mask``, bool, broadcastable to it, with ``return_mask=True``: the cells
    that some visible pixel reaches, as ``masked(x, mask, return_mask=True)``). Each neighbor-padded layer is one
    ``captum_layermask::NeighborPad`` function call.

    Args:
        model (nn.Module): a plain CNN (converted with :func:`~captum_layermask.layer_masked`) or a
            layer-masked one.
        path: where to write the ``.onnx`` file; nothing is written if anything fails.
        input_shape: ``(N, C, H, W)`` of the example input.
        opset (int, optional): the default-domain opset, 18 to 23 (default: the exporter's).
        dynamic_batch (bool): the batch size is dynamic (default).
        dynamic_size (bool): height and width are dynamic too, where the model allows it.
        verify_batch (int, optional): batch size of the verification run (default: one more than the example's
            when the batch is dynamic). With a dynamic batch the example has at least 2 images, since
            ``torch.export`` fixes dimensions of size 1.
        return_mask (bool): a second output, ``output_mask``.

    Returns:
        The path written.

    Raises:
        UnsupportedLayerError: if the model has operations that cannot be layer-masked.
        ExportError: for an unsupported opset, a failed export, checker errors or a verification mismatch.

    Examples::

        >>> export_masked(torchvision.models.resnet50(weights=...), "resnet50-masked.onnx", input_shape=(1, 3, 224, 224))
    """
    if opset is not None and opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset} is not supported; use {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}."
        )
    if len(input_shape) != 4 or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ExportError(f"input_shape must be (N, C, H, W) with positive sizes, got {tuple(input_shape)}.")
    path = Path(path)
    _check_target(path)
    masked = model if isinstance(model, LayerMaskedModel) else layer_masked(model)
    modes = {module: module.training for module in masked.modules()}  # shared with the user's model
    masked.eval()
    _check_input_shape(masked, input_shape)
    try:
        program = _to_onnx(masked, input_shape, opset, dynamic_batch, dynamic_size, return_mask)
        try:
            with staged(path, suffix=".onnx") as staging:  # beside the target: an atomic rename
                program.save(staging)
                onnx.checker.check_model(onnx.load(staging), full_check=True)
                batch = verify_batch or (max(input_shape[0], 2) + 1 if dynamic_batch else input_shape[0])
                verify(staging, masked, input_shape, batch, return_mask=return_mask)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported model fails onnx.checker: {error}") from None
    finally:
        for module, training in modes.items():
            module.training = training
    return path


def _check_target(path: Path) -> None:
    """Refuses, before any work, a target that is a folder or in a folder that cannot be written."""
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the path of the .onnx file to write.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: {parent} is not writable.")


def _check_input_shape(masked: nn.Module, input_shape: Sequence[int]) -> None:
    """Runs the model once on an example of ``input_shape``, so that a shape it cannot take fails with its cause."""
    try:
        with torch.no_grad():
            out = masked(torch.zeros(*input_shape), mask=torch.ones(input_shape[0], 1, *input_shape[2:]))
    except Exception as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"the model does not run on inputs of shape {tuple(input_shape)}: {cause}") from None
    if not isinstance(out, torch.Tensor):
        raise ExportError(
            f"the model returns a {type(out).__name__}, and the ONNX graph has one output; choose the tensor to "
            "export with layer_masked(model, output='logits') (an index or key of the model's output)."
        )


def _to_onnx(
    masked: nn.Module,
    input_shape: Sequence[int],
    opset: Optional[int],
    dynamic_batch: bool,
    dynamic_size: bool,
    return_mask: bool,
):
    batch = max(input_shape[0], 2) if dynamic_batch else input_shape[0]  # torch.export fixes dimensions of size 1
    image = torch.randn(batch, *input_shape[1:], generator=torch.Generator().manual_seed(0))
    mask = verification_masks(batch, *input_shape[2:])["half removed"]
    if masked.captured_by == "export":
        if dynamic_size:
            raise ExportError(
                "this model was captured by torch.export, one graph per input size; export one file per "
                "resolution (dynamic_size=False)."
            )
        with torch.no_grad():
            masked(image, mask=mask)  # its graph for this shape is made at the first call
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch")
    if dynamic_size:
        dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                masked,
                (image,),
                kwargs={"mask": mask, "return_mask": True} if return_mask else {"mask": mask},
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME, MASK_OUTPUT_NAME] if return_mask else [OUTPUT_NAME],
                dynamic_shapes=({"x": dims, "mask": dims} | ({"return_mask": None} if return_mask else {}))
                if dims
                else None,
                custom_translation_table={torch.ops.captum_layermask.neighbor_pad.default: neighbor_pad_translation},
                verbose=False,
            )
    except Exception as error:  # the exporter's own errors carry its report; keep their first line
        raise ExportError(f"torch.onnx.export failed: {str(error).strip().splitlines()[0]}") from error
    add_neighbor_pad_function(program.model)
    if dynamic_batch:
        _broadcast_mask(program.model)
    return program


def _broadcast_mask(model) -> None:
    """Lets the ``mask`` input have batch size 1 for any batch of images, as PyTorch broadcasts it: its batch
    dimension gets its own name, and an ``Expand`` to the image's batch feeds every node that read it."""
    import onnx_ir as ir

    graph = model.graph
    image, mask = graph.inputs[0], graph.inputs[1]
    users = list(mask.uses())
    mask.shape = ir.Shape([ir.SymbolicDim("mask_batch"), *list(mask.shape)[1:]])
    batch = ir.node("Shape", [image], {"start": 0, "end": 1}, name="image_batch")
    rest = ir.node("Shape", [mask], {"start": 1}, name="mask_rest")
    shape = ir.node("Concat", [batch.outputs[0], rest.outputs[0]], {"axis": 0}, name="mask_shape")
    expand = ir.node("Expand", [mask, shape.outputs[0]], name="mask_broadcast")
    expand.outputs[0].name = "mask_broadcast"
    graph.insert_before(graph.node(0), [batch, rest, shape, expand])
    for user, index in users:
        user.replace_input_with(index, expand.outputs[0])
