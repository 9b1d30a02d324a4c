"""Neighbor padding (paper Algorithm 1) as an ONNX function in the project's own domain.

The layer-masked graph exports every padded layer as one ``captum_layermask::NeighborPad`` node whose ``width``
attribute is its number of rings. The function body uses standard ONNX operators only (a Loop over the rings;
each ring sums 3x3 neighbourhoods with Pad, Slice and Add, on the activations and the mask concatenated), so
stock onnxruntime runs it without a custom-op library.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema, has, register_schema
from onnxscript import opset18 as op
from onnxscript.onnx_types import FLOAT
from onnxscript.values import Opset

DOMAIN = "captum_layermask"
layermask = Opset(DOMAIN, 1)

if not has("NeighborPad", DOMAIN):  # lets onnxscript emit calls of the function by name
    register_schema(
        OpSchema(
            "NeighborPad",
            DOMAIN,
            1,
            inputs=[OpSchema.FormalParameter("x", "T"), OpSchema.FormalParameter("mask", "T")],
            outputs=[OpSchema.FormalParameter("padded", "T")],
            type_constraints=[("T", ["tensor(float)"], "activations and mask (1 = visible)")],
            attributes=[OpSchema.Attribute("width", OpSchema.AttrType.INT, "rings of removed cells to fill")],
        )
    )


@onnxscript.script(layermask, default_opset=op)
def NeighborPad(x: FLOAT, mask: FLOAT, width: int) -> FLOAT:
    one = op.CastLike(op.Constant(value_float=1.0), x)
    known = op.CastLike(op.Greater(mask, op.CastLike(op.Constant(value_float=0.0), x)), x)
    padded = x * known
    channels = op.Shape(x, start=1, end=2)
    for _ in range(width):
        both = op.Pad(op.Concat(padded, known, axis=1), op.Constant(value_ints=[0, 0, 1, 1, 0, 0, 1, 1]))
        rows = (
            op.Slice(both, op.Constant(value_ints=[0]), op.Constant(value_ints=[-2]), op.Constant(value_ints=[2]))
            + op.Slice(both, op.Constant(value_ints=[1]), op.Constant(value_ints=[-1]), op.Constant(value_ints=[2]))
            + op.Slice(
                both, op.Constant(value_ints=[2]), op.Constant(value_ints=[2147483647]), op.Constant(value_ints=[2])
            )
        )
        sums = (
            op.Slice(rows, op.Constant(value_ints=[0]), op.Constant(value_ints=[-2]), op.Constant(value_ints=[3]))
            + op.Slice(rows, op.Constant(value_ints=[1]), op.Constant(value_ints=[-1]), op.Constant(value_ints=[3]))
            + op.Slice(
                rows, op.Constant(value_ints=[2]), op.Constant(value_ints=[2147483647]), op.Constant(value_ints=[3])
            )
        )
        neighbours = op.Slice(sums, op.Constant(value_ints=[0]), channels, op.Constant(value_ints=[1]))
        count = op.Slice(sums, channels, op.Constant(value_ints=[2147483647]), op.Constant(value_ints=[1]))
        grown = op.Min(count, one)
        padded = padded + neighbours * ((grown - known) / op.Max(count, one))
        known = grown
    return padded


def neighbor_pad_translation(x, mask, width: int):
    """Translation of ``torch.ops.captum_layermask.neighbor_pad`` for ``torch.onnx.export``: one function call."""
    return layermask.NeighborPad(x, mask, width=width)


def add_neighbor_pad_function(model: ir.Model) -> None:
    """Adds the FunctionProto to an exported model, for the model's own default opset version."""
    function = ir.serde.deserialize_function(NeighborPad.to_function_proto())
    function.opset_imports[""] = model.opset_imports[""]
    model.functions[function.identifier()] = function
    model.opset_imports.setdefault(DOMAIN, 1)
