"""Fewer padding rings where the padded cells are never read: the outputs stay those of full layer masking."""

import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import layer_masked, neighbor_pad, propagate_mask, register_rule, unregister
from captum_layermask.core.masked import Masked
from captum_layermask.core.primitives import pad_for_convolution

from .helpers import demanded_rings, layer_masked_full_padding, patch_masks, randomize_batchnorm


def rings_of(model):
    return {node.target: rings for node, rings in demanded_rings(model).items()}


class Block(nn.Module):
    """conv -> relu -> conv, plus a skip connection that is either the input or a third convolution of it."""

    def __init__(self, skip_conv=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 3, padding=1) if skip_conv else nn.Identity()

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + self.skip(x))


def test_a_residual_blocks_last_convolution_needs_no_padding():
    # the sum keeps the block input's mask, so b's outputs are read only where its input is visible
    assert rings_of(nn.Sequential(Block(), Block())) == {"0.b": 0, "1.b": 0}
    assert rings_of(torchvision.models.resnet18()) == {
        f"{block}.conv2": 0 for block in ("layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1")
    }


def test_bottlenecks_and_inverted_residuals_need_one_ring_of_two():
    rings = rings_of(torchvision.models.resnet50())
    assert set(rings.values()) == {1} and "layer1.0.conv2" in rings and "layer2.0.conv2" not in rings  # stride 2
    assert set(rings_of(torchvision.models.mobilenet_v2()).values()) == {1}


def test_a_sum_keeps_the_smaller_growth():
    # b grows its input's mask by 2, the skip convolution by 1: the sum keeps 1, so b pads 1 ring of 2
    assert rings_of(Block(skip_conv=True)) == {"b": 1}


def test_convolutions_whose_outputs_are_all_read_pad_in_full():
    assert rings_of(torchvision.models.vgg11()) == {}
    assert rings_of(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))) == {}


MODELS = {
    "blocks": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), Block(), Block(skip_conv=True), nn.AdaptiveAvgPool2d(1)
    ),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


@pytest.mark.parametrize("name", MODELS)
def test_outputs_equal_those_of_full_padding(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(MODELS[name]().eval())
    x, mask = torch.randn(3, 3, 64, 64), patch_masks(3, 64, 64, patch=8, keep=0.4)
    assert rings_of(model)
    fewer, full = layer_masked(model), layer_masked_full_padding(model)
    with torch.no_grad():
        expected = full(x, mask)
        assert torch.allclose(fewer(x, mask), expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_a_custom_convolution_rule_is_left_alone():
    def rule(op, x, *args, **kwargs):
        return Masked(op(neighbor_pad(x.value, x.mask, 2), *args, **kwargs), propagate_mask(x.mask, 3, 1, 1))

    assert demanded_rings(nn.Sequential(Block()), rules={nn.Conv2d: rule}) == {}
    register_rule(nn.Conv2d, rule=rule)
    try:
        assert demanded_rings(nn.Sequential(Block())) == {}
    finally:
        unregister(rule)
    assert demanded_rings(nn.Sequential(Block())) != {}


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (5, 1, "same", 1), (3, 1, 0, 1), (3, 1, 2, 2), ((1, 3), 1, (0, 1), 1)],
)
def test_pad_for_convolution_matches_neighbor_pad_and_propagate_mask(kernel, stride, padding, dilation):
    x, mask = torch.randn(2, 3, 15, 13), (torch.rand(2, 1, 15, 13) < 0.2).float()
    padded, out_mask = pad_for_convolution(x, mask, kernel, stride, padding, dilation)
    reach = (max(kernel) if isinstance(kernel, tuple) else kernel) - 1
    assert torch.equal(padded, neighbor_pad(x, mask, reach * dilation))
    assert torch.equal(out_mask, propagate_mask(mask, kernel, stride, padding, dilation))
    fewer, same_mask = pad_for_convolution(x, mask, kernel, stride, padding, dilation, rings=0)
    assert fewer is x and torch.equal(same_mask, out_mask)
