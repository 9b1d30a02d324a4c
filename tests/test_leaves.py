"""Treating modules and functions as one operation (register_leaf), rule sets of layer libraries, and rules that
mask a composite module by its parts (rules.apply)."""

import sys
import types

import pytest
import torch
from torch import nn

from captum_layermask import (
    Masked,
    TracingError,
    UnsupportedLayerError,
    layer_masked,
    register_leaf,
    register_mask_decoder,
    register_rule,
    register_rule_set,
    register_token_block,
    unregister,
)
from captum_layermask.core import registry


class SizeDependent(nn.Module):
    """Python control flow on the input size: torch.fx cannot trace it."""

    def forward(self, x):
        if x.shape[-1] > 4:
            return torch.relu(x)
        return x


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = block

    def forward(self, x):
        return self.block(self.conv(x)).mean((2, 3))


def relu_rule(op, x):
    return Masked(op(x.value), x.mask)


def test_a_leaf_module_with_a_rule_converts_and_without_the_leaf_tracing_fails():
    model, x, mask = Net(SizeDependent()).eval(), torch.randn(2, 3, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    with pytest.raises(TracingError, match="register_leaf"):
        layer_masked(model, capture="fx")
    reference = Net(nn.ReLU()).eval()
    reference.conv = model.conv
    converted = layer_masked(model, leaves=[SizeDependent], rules={SizeDependent: relu_rule})  # this call only
    assert torch.equal(converted(x, mask), layer_masked(reference)(x, mask))
    with pytest.raises(TracingError):
        layer_masked(model, capture="fx")
    assert register_leaf(SizeDependent) is SizeDependent and register_rule(SizeDependent, rule=relu_rule) is relu_rule
    try:
        assert torch.equal(layer_masked(model)(x, mask), layer_masked(reference)(x, mask))  # registered for all
    finally:
        unregister(SizeDependent, relu_rule)
    with pytest.raises(TracingError):
        layer_masked(model, capture="fx")  # unregister undid both
    with pytest.raises(KeyError, match="not registered"):
        unregister(relu_rule)


def test_every_register_function_is_a_decorator_that_returns_its_argument_and_unregister_undoes_it():
    @register_leaf
    class Leaf(SizeDependent):
        pass

    @register_rule(Leaf)
    def leaf_rule(op, x):
        return relu_rule(op, x)

    @register_token_block(when=lambda module: True)
    class Block(nn.Module):
        pass

    @register_mask_decoder
    def decoder(x, others):
        return None

    @register_rule_set("fakelayers_decorated")
    def load():
        pass

    assert isinstance(Leaf, type) and callable(leaf_rule) and isinstance(Block, type) and callable(load)
    model = Net(Leaf()).eval()
    layer_masked(model)
    unregister(Leaf, leaf_rule, Block, decoder, load)
    with pytest.raises(TracingError):
        layer_masked(model, capture="fx")
    from captum_layermask.core.gathering import TOKEN_BLOCKS
    from captum_layermask.core.model import MASK_DECODERS

    assert Block not in TOKEN_BLOCKS and id(decoder) not in MASK_DECODERS
    assert "fakelayers_decorated" not in registry.RULE_SETS


def position_table(height, width, table):
    """Reads only parameters and sizes, with control flow on the sizes."""
    if height * width > table.shape[-1]:
        raise ValueError("too large")
    return table[..., : height * width].reshape(1, -1, height, width)


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 3, 256))

    def forward(self, x):
        return x + position_table(x.shape[-2], x.shape[-1], self.table)


def test_a_leaf_function_that_reads_no_pixel_needs_no_rule():
    model, x = WithPositions(), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with pytest.raises(TracingError):
        layer_masked(model, capture="fx")
    masked = layer_masked(model, leaves=[position_table])
    with torch.no_grad():
        assert torch.equal(masked(x, mask), model(x) * mask)


def blur_if_large(x):
    return x.mean(1, keepdim=True) if x.shape[-1] > 4 else x


class UsesImageFunction(nn.Module):
    def forward(self, x):
        return blur_if_large(x)


def test_a_leaf_function_on_the_image_without_a_rule_is_named_in_the_refusal():
    with pytest.raises(UnsupportedLayerError, match="blur_if_large"):
        layer_masked(UsesImageFunction(), leaves=[blur_if_large])


def test_leaves_must_be_module_classes_or_python_functions():
    with pytest.raises(TypeError, match="module class or a Python function"):
        register_leaf(torch.relu)
    with pytest.raises(TypeError):
        register_leaf("relu")


def test_a_rule_set_loads_once_and_only_for_models_that_use_its_package(monkeypatch):
    package = types.ModuleType("fakelayers")
    monkeypatch.setitem(sys.modules, "fakelayers", package)
    Block = type("Block", (SizeDependent,), {"__module__": "fakelayers.blocks"})
    loads = []

    def load():
        loads.append(1)
        register_leaf(Block)
        register_rule(Block, rule=relu_rule)

    register_rule_set("fakelayers", load)
    try:
        layer_masked(nn.Sequential(nn.Conv2d(3, 3, 1)))
        assert loads == []
        layer_masked(Net(Block()).eval())
        layer_masked(Net(Block()).eval())
        assert loads == [1]
    finally:
        registry.RULE_SETS.pop("fakelayers", None)
        if loads:
            unregister(Block, relu_rule)


class ConvThenScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 2:  # untraceable
            x = self.conv(x)
        return 2 * x


def composite_rule(op, x, *, rules):
    return rules.apply(torch.mul, rules.apply(op.conv, x), 2)


@pytest.mark.parametrize("padding", ["neighbor", "zero", "partial"])
def test_a_composite_rule_masks_its_parts_with_the_conversions_rules(padding):
    block, x = ConvThenScale().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).double()
    masked = layer_masked(
        nn.Sequential(block), padding=padding, leaves=[ConvThenScale], rules={ConvThenScale: composite_rule}
    )(x, mask)
    expected = 2 * layer_masked(nn.Sequential(block.conv), padding=padding)(x, mask)
    assert torch.allclose(masked, expected, atol=1e-12)


def test_a_composite_rule_names_a_part_without_a_rule():
    class Odd(nn.Module):
        def forward(self, x):
            return x

    def rule(op, x, *, rules):
        return rules.apply(Odd(), x)

    masked = layer_masked(nn.Sequential(ConvThenScale()), leaves=[ConvThenScale], rules={ConvThenScale: rule})
    with pytest.raises(UnsupportedLayerError, match="Odd has no masking rule"):
        masked(torch.randn(1, 3, 4, 4), torch.ones(1, 1, 4, 4))
