"""neighbor_pad (Algorithm 1) and propagate_mask (MaxPool_k of section 3.2)."""

import pytest
import torch
import torchvision

from captum_layermask import layer_masked, neighbor_pad, propagate_mask
from captum_layermask.core.primitives import pad_for_convolution

from .helpers import paper_neighbor_pad, visible_any


def row(*values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def test_one_ring_takes_the_mean_of_visible_neighbours():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    mask = torch.ones(1, 1, 3, 3)
    mask[..., 1, 1] = 0
    padded = neighbor_pad(x, mask, 1)
    assert padded[0, 0, 1, 1] == (36.0 - 4.0) / 8
    assert torch.equal(padded[mask.bool()], x[mask.bool()])


def test_a_cell_between_two_visible_cells_averages_them():
    assert torch.equal(neighbor_pad(row(2.0, 99.0, 6.0), row(1, 0, 1), 1), row(2.0, 4.0, 6.0))


def test_second_ring_uses_first_ring_values():
    x, mask = row(1.0, 0.0, 0.0, 0.0, 5.0), row(1, 0, 0, 0, 1)
    assert torch.equal(neighbor_pad(x, mask, 1), row(1.0, 1.0, 0.0, 5.0, 5.0))
    assert torch.equal(neighbor_pad(x, mask, 2), row(1.0, 1.0, 3.0, 5.0, 5.0))


def test_cells_beyond_the_width_are_zero():
    x, mask = row(7.0, 1.0, 1.0, 1.0, 1.0), row(1, 0, 0, 0, 0)
    assert torch.equal(neighbor_pad(x, mask, 2), row(7.0, 7.0, 7.0, 0.0, 0.0))
    assert torch.equal(neighbor_pad(x, mask, 0), row(7.0, 0.0, 0.0, 0.0, 0.0))


def test_corner_fill_uses_diagonal_neighbours():
    x = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(neighbor_pad(x, mask, 1), torch.full((1, 1, 2, 2), 4.0))


@pytest.mark.parametrize("width", [1, 2, 3, 6])
def test_matches_algorithm_1_on_random_inputs(width):
    x = torch.randn(3, 4, 17, 13, dtype=torch.float64)
    mask = (torch.rand(3, 1, 17, 13) < 0.2).double()
    assert torch.allclose(neighbor_pad(x, mask, width), paper_neighbor_pad(x, mask, width), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_rings_beyond_the_grid_change_nothing_and_are_not_computed(requires_grad):
    # a dilated convolution on a small map (DeepLab's rate 36 on 14x14 asks for 72 rings): after max(H, W) - 1
    # every cell is reached; the result is Algorithm 1's with all the rings, and its output mask too
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=requires_grad)
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.float64)
    mask[0, 0, 0, 0] = 1
    mask[1, 0, 4, 3] = 1
    padded = neighbor_pad(x, mask, 30)
    assert torch.allclose(padded, paper_neighbor_pad(x.detach(), mask, 30), rtol=1e-7, atol=1e-7)
    assert torch.allclose(neighbor_pad(x, mask, 6), padded, rtol=1e-12, atol=1e-12)
    _, output_mask = pad_for_convolution(x, mask, 61, padding=30)
    assert torch.equal(output_mask, torch.ones_like(mask))


def test_broadcast_mask_and_bool_mask():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = torch.rand(1, 1, 8, 8) < 0.3
    expected = paper_neighbor_pad(x, mask.double(), 2)
    assert torch.allclose(neighbor_pad(x, mask, 2), expected, atol=1e-7)


def test_removed_values_never_reach_the_result():
    x = torch.randn(2, 20, 10, 10)  # 20 channels: the depthwise box filter; the image tests cover the other
    mask = (torch.rand(2, 1, 10, 10) < 0.4).float()
    garbage = torch.where(mask > 0, x, 1e30 * torch.randn_like(x))
    assert torch.equal(neighbor_pad(garbage, mask, 3), neighbor_pad(x, mask, 3))
    assert torch.allclose(neighbor_pad(x, mask, 3), paper_neighbor_pad(x, mask, 3), atol=1e-5)


def test_invalid_width_is_refused():
    with pytest.raises(ValueError, match="non-negative int"):
        neighbor_pad(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), -1)


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((7, 7), (2, 2), (3, 3), (1, 1)),
        ((3, 3), (2, 2), (0, 0), (2, 2)),
        ((1, 7), (1, 1), (0, 3), (1, 1)),
    ],
)
def test_propagate_mask_marks_outputs_that_read_a_visible_cell(kernel, stride, padding, dilation):
    mask = (torch.rand(2, 1, 15, 12) < 0.15).float()
    expected = visible_any(mask, kernel, stride, padding, dilation)
    assert torch.equal(propagate_mask(mask, kernel, stride, padding, dilation), expected)


def test_propagate_mask_same_padding_matches_conv_output_size():
    conv = torch.nn.Conv2d(1, 1, (4, 3), padding="same", dilation=2)
    mask = torch.ones(1, 1, 9, 10)
    assert propagate_mask(mask, conv.kernel_size, padding="same", dilation=2).shape == conv(mask).shape


def test_tensors_and_layers_are_created_on_the_device_the_suite_runs_on(request):
    expected = torch.device(request.config.getoption("--device")).type
    assert torch.empty(1).device.type == expected and torch.nn.Linear(2, 2).weight.device.type == expected


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18", "efficientnet_b0"])
def test_a_full_mask_gives_the_model_itself_to_the_bit(name):
    """With nothing removed no convolution is padded and every mean is the layer's own (eager mode)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 48, 48)
    masked = layer_masked(model)
    with torch.no_grad():
        assert torch.equal(masked(x, torch.ones(2, 1, 48, 48)), model(x))
        assert torch.equal(masked(x, torch.ones(48, 48, dtype=torch.bool)), model(x))
    image = torch.randn(1, 3, 9, 9)
    padded, output_mask = pad_for_convolution(image, torch.ones(1, 1, 9, 9), 3, stride=2, padding=1)
    assert padded is image and torch.equal(output_mask, torch.ones(1, 1, 5, 5))
