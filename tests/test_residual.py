"""How residual sums combine masks: the paper's intersection (the default) and the union variant.

With the intersection, a region that a strided 1x1 shortcut does not sample vanishes: the logits are exactly 0
although the main branch sees visible pixels. The union keeps every visible cell of either summand and fills
the other summand there by neighbor padding, so no removed pixel enters either way.
"""

import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import layer_masked, neighbor_pad, patch_segments

from .helpers import FAMILIES, MEAN, STD, build, demanded_rings


class StridedBlock(nn.Module):
    """A 3x3 stride-2 main branch plus a 1x1 stride-2 shortcut, summed: ResNet's downsampling block in small."""

    def __init__(self):
        super().__init__()
        self.main = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(2, 3, 1, stride=2)

    def forward(self, x):
        return self.main(x) + self.shortcut(x)


def test_union_sum_is_the_direct_computation():
    torch.manual_seed(0)
    block = StridedBlock().eval()
    x = torch.randn(1, 2, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, 5] = 1  # an odd row: the shortcut's even-position sampling misses it
    main_value = layer_masked(block.main)(x, mask)
    main_mask = (nn.functional.max_pool2d(mask, 3, 2, 1) > 0).float()  # the 3x3 convolution's output mask
    shortcut_value, shortcut_mask = block.shortcut(x * mask), mask[..., ::2, ::2]
    assert shortcut_mask.sum() == 0 and main_mask.sum() > 0
    # union: the shortcut has no visible cell in this sample, so it contributes 0 (neighbor padding fills nothing)
    expected = torch.where(main_mask > 0, main_value + neighbor_pad(shortcut_value, shortcut_mask, 8), 0)
    got = layer_masked(block, residual="union")(x, mask)
    assert torch.allclose(got, expected, atol=1e-6) and got.abs().sum() > 0
    assert layer_masked(block)(x, mask).abs().sum() == 0  # the paper's intersection: nothing survives


def test_union_fills_the_removed_summand_by_neighbor_padding_from_its_own_visible_cells():
    torch.manual_seed(0)
    block = StridedBlock().eval()
    x = torch.randn(1, 2, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    main_value, main_mask = layer_masked(block.main)(x, mask), (nn.functional.max_pool2d(mask, 3, 2, 1) > 0).float()
    shortcut_mask = mask[..., ::2, ::2]
    shortcut_value = block.shortcut(x * mask)
    filled = neighbor_pad(shortcut_value, shortcut_mask, 1)  # one ring reaches every cell of the main mask here
    union = torch.maximum(main_mask, shortcut_mask)
    expected = torch.where(union > 0, main_value + filled, 0)
    assert torch.allclose(layer_masked(block, residual="union")(x, mask), expected, atol=1e-6)
    intersection = torch.where(union * main_mask * shortcut_mask > 0, main_value + shortcut_value, 0)
    assert torch.allclose(layer_masked(block)(x, mask), intersection, atol=1e-6)


def test_the_paper_rule_loses_regions_that_a_strided_shortcut_skips():
    """The documented behaviour of the default: ResNet-18, 32x32, only the bottom half visible: logits exactly 0."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 16:, :] = True
    assert layer_masked(model)(x, mask).abs().max() == 0
    union = layer_masked(model, residual="union")
    other = torch.where(mask, torch.randn_like(x), x)
    assert union(x, mask).abs().max() > 0 and not torch.equal(union(x, mask), union(other, mask))


RESIDUAL_FAMILIES = ["resnet18", "mobilenet_v2", "regnet_y_400mf", "efficientnet_b0", "convnext_tiny"]
"""Fast: a family per kind of residual sum (basic block, inverted residual, SE block, MBConv, ConvNeXt block)."""


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[] if name in RESIDUAL_FAMILIES else [pytest.mark.slow]) for name in FAMILIES]
)
def test_union_keeps_every_single_visible_patch_and_the_invariants(name):
    model, masked, x, mask = build(name, "union")
    size = x.shape[-1]
    with torch.no_grad():
        reference = model(x)
        full = masked(x, torch.ones_like(mask))
        assert (full - reference).abs().max() <= 1e-5 * reference.abs().max()  # a full mask is the model
        out = masked(x, mask)
        for fill in (1e3 * torch.randn_like(x), torch.full_like(x, float("nan"))):  # no removed pixel enters
            assert torch.equal(masked(torch.where(mask, x, fill), mask), out)
        black, grey = torch.where(mask, x, -MEAN / STD), torch.where(mask, x, 0.0)
        assert torch.equal(masked(black, mask), masked(grey, mask))
        segments = patch_segments(size, size, 16)[0, 0]
        single = (segments[None] == torch.arange(int(segments.max()) + 1)[:, None, None])[:, None]
        logits = masked(x[:1].expand(len(single), -1, -1, -1), single)
        assert (logits != 0).any(1).all(), f"{int((logits == 0).all(1).sum())} single visible patches vanish"
        full_padding = layer_masked(model, residual="union", prune_padding=False)(x, mask)
        assert (out - full_padding).abs().max() <= 1e-6 * full_padding.abs().max()  # the demand analysis holds


def test_the_demand_analysis_reads_the_grown_cells_under_the_union():
    model = torchvision.models.resnet18(num_classes=10).eval()
    assert len(demanded_rings(model, residual="union")) < len(demanded_rings(model))
