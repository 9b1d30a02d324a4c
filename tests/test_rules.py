"""Each built-in rule against a direct computation of the paper's formula."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

from captum_layermask import UnsupportedLayerError, layer_masked, neighbor_pad
from captum_layermask.core import rules
from captum_layermask.core.masked import Masked

from .helpers import paper_neighbor_pad, visible_any, windows


def random_mask(n, h, w, keep=0.3):
    return (torch.rand(n, 1, h, w) < keep).double()


def pairs(*values):
    return [v if isinstance(v, tuple) else (v, v) for v in values]


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=5, stride=2, padding=2),
        dict(kernel_size=3, dilation=2, padding=2),
        dict(kernel_size=(1, 7), padding=(0, 3)),
        dict(kernel_size=3, padding=1, groups=2),
        dict(kernel_size=2, stride=2),
    ],
)
def test_conv_equals_paper_neighbor_padding_on_kept_outputs(conv):
    layer = nn.Conv2d(4, 6, **conv).double()
    x, mask = torch.randn(2, 4, 13, 11, dtype=torch.float64), random_mask(2, 13, 11)
    kernel, stride, padding, dilation = pairs(layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    receptive_field = max((k - 1) * d + 1 for k, d in zip(kernel, dilation))  # the paper's k
    kept = visible_any(mask, kernel, stride, padding, dilation)
    expected = layer(paper_neighbor_pad(x, mask, receptive_field)) * kept
    for model in (nn.Sequential(layer), layer):  # module rule, and F.conv2d traced inside Conv2d.forward
        assert torch.allclose(layer_masked(model)(x, mask), expected, atol=1e-9)


def test_conv_with_reflect_padding_pads_the_mask_alike():
    layer = nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect").double()
    x, mask = torch.randn(1, 3, 9, 9, dtype=torch.float64), random_mask(1, 9, 9)
    kept = visible_any(F.pad(mask, (1, 1, 1, 1), mode="reflect"), (3, 3), (1, 1), (0, 0), (1, 1))
    expected = layer(paper_neighbor_pad(x, mask, 3)) * kept
    assert torch.allclose(layer_masked(nn.Sequential(layer))(x, mask), expected, atol=1e-9)


def test_zero_padding_variant_convolves_the_zero_filled_input():
    layer = nn.Conv2d(3, 2, 3, padding=1).double()
    x, mask = torch.randn(2, 3, 8, 8, dtype=torch.float64), random_mask(2, 8, 8)
    expected = layer(x * mask) * visible_any(mask, (3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.allclose(layer_masked(nn.Sequential(layer), padding="zero")(x, mask), expected, atol=1e-9)


def test_partial_convolution_rescales_by_the_visible_share_of_the_window():
    layer = nn.Conv2d(3, 2, 3, padding=1).double()
    x, mask = torch.randn(2, 3, 8, 8, dtype=torch.float64), random_mask(2, 8, 8, keep=0.6)
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    inside = F.conv2d(torch.ones(1, 1, 8, 8, dtype=torch.float64), ones, padding=1)
    visible = F.conv2d(mask, ones, padding=1)
    scale = torch.where(visible > 0, inside / visible.clamp(min=1), 0)
    response = F.conv2d(x * mask, layer.weight, None, padding=1)
    expected = (response * scale + layer.bias.view(1, -1, 1, 1)) * (visible > 0)
    assert torch.allclose(layer_masked(nn.Sequential(layer), padding="partial")(x, mask), expected, atol=1e-9)


@pytest.mark.parametrize("variant", ["neighbor", "zero", "partial"])
def test_every_padding_variant_reproduces_the_model_with_a_full_mask(variant):
    layer = nn.Conv2d(3, 2, 3, padding=1).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(layer_masked(nn.Sequential(layer), padding=variant)(x, torch.ones(8, 8)), layer(x))


def test_unknown_padding_variant_is_refused():
    with pytest.raises(ValueError, match="padding must be one of"):
        layer_masked(nn.Conv2d(1, 1, 1), padding="reflect")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("samples_per_slice", [None, 2])
def test_max_pool_takes_the_maximum_over_visible_cells_only(layout, samples_per_slice, monkeypatch):
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    x, mask = torch.randn(3, 3, 9, 9, dtype=torch.float64), random_mask(3, 9, 9)
    x = torch.where(mask > 0, x, 1e6).contiguous(memory_format=layout)  # a removed cell would win its windows
    if samples_per_slice:  # the fill copy is made in batch slices of this many samples
        monkeypatch.setattr(rules.common, "_SLICE_BYTES", samples_per_slice * x[0].numel() * x.element_size())
    out = layer_masked(nn.Sequential(pool))(x, mask)
    assert out.is_contiguous(memory_format=layout)
    for i, j, cells in windows(9, 9, (3, 3), (2, 2), (1, 1)):
        for b in range(3):
            seen = [x[b, :, y, z] for y, z in cells if mask[b, 0, y, z] > 0]
            expected = torch.stack(seen).amax(0) if seen else torch.zeros(3, dtype=torch.float64)
            assert torch.equal(out[b, :, i, j], expected)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_averages_visible_cells_with_the_layers_border_scaling(count_include_pad):
    pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
    x, mask = torch.randn(1, 2, 6, 6, dtype=torch.float64), random_mask(1, 6, 6, keep=0.5)
    out = layer_masked(nn.Sequential(pool))(x, mask)
    for i, j, cells in windows(6, 6, (3, 3), (1, 1), (1, 1)):
        seen = [x[0, :, y, z] for y, z in cells if mask[0, 0, y, z] > 0]
        divisor = 9 if count_include_pad else len(cells)
        expected = torch.stack(seen).mean(0) * len(cells) / divisor if seen else torch.zeros(2, dtype=torch.float64)
        assert torch.allclose(out[0, :, i, j], expected)
    assert torch.allclose(layer_masked(nn.Sequential(pool))(x, torch.ones(6, 6)), pool(x))


@pytest.mark.parametrize("size", [1, 3])
def test_adaptive_avg_pool_is_the_mean_of_visible_cells(size):
    x, mask = torch.randn(2, 4, 7, 7, dtype=torch.float64), random_mask(2, 7, 7)
    out = layer_masked(nn.Sequential(nn.AdaptiveAvgPool2d(size)))(x, mask)
    for b in range(2):
        for i in range(size):
            for j in range(size):
                rows = slice(i * 7 // size, -(-(i + 1) * 7 // size))
                cols = slice(j * 7 // size, -(-(j + 1) * 7 // size))
                visible = mask[b, 0, rows, cols] > 0
                expected = (
                    x[b, :, rows, cols][:, visible].mean(1) if visible.any() else torch.zeros(4, dtype=torch.float64)
                )
                assert torch.allclose(out[b, :, i, j], expected)


class GlobalMean(nn.Module):
    def forward(self, x):
        return torch.cat([x.mean([2, 3]), torch.mean(x, dim=(-1, -2), keepdim=True).flatten(1)], 1)


def test_mean_over_spatial_dims_averages_visible_cells():
    x, mask = torch.randn(3, 2, 5, 5, dtype=torch.float64), random_mask(3, 5, 5, keep=0.5)
    mask[2] = 0
    out = layer_masked(GlobalMean())(x, mask)
    expected = (x * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)
    assert torch.allclose(out, torch.cat([expected, expected], 1))
    assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64))


def test_flatten_of_a_spatial_map_ends_the_spatial_part_with_zero_fill():
    conv, fc = nn.Conv2d(2, 3, 3, padding=1).double(), nn.Linear(3 * 6 * 6, 4).double()
    model = nn.Sequential(conv, nn.Flatten(), fc)
    x, mask = torch.randn(2, 2, 6, 6, dtype=torch.float64), random_mask(2, 6, 6)
    kept = visible_any(mask, (3, 3), (1, 1), (1, 1), (1, 1))
    expected = fc((conv(paper_neighbor_pad(x, mask, 3)) * kept).flatten(1))
    assert torch.allclose(layer_masked(model)(x, mask), expected)


class Shuffle(nn.Module):
    def __init__(self, shuffle):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1).double()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1).double()
        self.shuffle = shuffle

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(channel_shuffle(y, 2) if self.shuffle else y)


def test_channel_shuffle_keeps_the_mask_on_the_pixels():
    plain, shuffled = Shuffle(False), Shuffle(True)
    shuffled.load_state_dict(plain.state_dict())
    with torch.no_grad():  # permute conv2's input channels so that both models compute the same function
        shuffled.conv2.weight.copy_(plain.conv2.weight[:, torch.tensor([0, 2, 1, 3])])
    x, mask = torch.randn(2, 3, 8, 8, dtype=torch.float64), random_mask(2, 8, 8)
    assert torch.allclose(layer_masked(shuffled)(x, mask), layer_masked(plain)(x, mask))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1).double()
        self.b = nn.Conv2d(2, 2, 5, padding=2).double()

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_channel_concatenation_is_visible_where_every_branch_is():
    x, mask = torch.randn(1, 2, 9, 9, dtype=torch.float64), random_mask(1, 9, 9)
    model = Branches()
    out = layer_masked(model)(x, mask)
    assert torch.equal((out != 0).any(1, keepdim=True), mask > 0)  # the 5x5 branch alone reaches further
    expected = torch.cat([model.a(x), model.b(paper_neighbor_pad(x, mask, 5))], 1) * mask
    assert torch.allclose(out, expected)


class Crop(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3).double()

    def forward(self, x):
        return self.conv(x[:, :, 2:-1, 1:])


def test_spatial_slicing_slices_the_mask():
    x, mask = torch.randn(2, 3, 10, 10, dtype=torch.float64), random_mask(2, 10, 10, keep=0.5)
    model = Crop()
    expected = layer_masked(nn.Sequential(model.conv))(x[:, :, 2:-1, 1:], mask[:, :, 2:-1, 1:])
    assert torch.equal(layer_masked(model)(x, mask), expected)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_channels_last_layer_norm_and_linear_are_pointwise(norm):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        torchvision_permute([0, 2, 3, 1]),
        norm(4),
        nn.Linear(4, 4),
        torchvision_permute([0, 3, 1, 2]),
    ).double()
    x, mask = torch.randn(2, 3, 6, 6, dtype=torch.float64), random_mask(2, 6, 6)
    masked = layer_masked(model)(x, mask)
    assert torch.equal(layer_masked(model)(x, mask), masked)  # a second trace (torch.fx once broke on F.rms_norm)
    reference = model[4](model[3](model[2](model[1](model[0](paper_neighbor_pad(x, mask, 3))))))
    assert torch.allclose(masked, reference * visible_any(mask, (3, 3), (1, 1), (1, 1), (1, 1)))


def torchvision_permute(dims):
    from torchvision.ops.misc import Permute

    return Permute(dims)


class SpatialLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x)


class SpatialNegativeNorm(nn.Module):
    def forward(self, x):
        return x.norm(p=-1, dim=(2, 3))


@pytest.mark.parametrize(
    "model, message",
    [
        (SpatialLinear(), "a linear layer mixes values along dimension 3"),
        (SpatialNegativeNorm(), "a norm of order -1 over spatial dimensions"),
    ],
)
def test_operations_that_mix_pixels_without_a_rule_fail_loudly(model, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        layer_masked(model)(torch.randn(1, 2, 6, 6), torch.ones(6, 6))


def test_batch_norm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    masked = layer_masked(model)
    masked(torch.randn(2, 3, 4, 4), torch.ones(4, 4))
    model.train()
    with pytest.raises(UnsupportedLayerError, match=r"'1'.*call \.eval\(\)"):
        masked(torch.randn(2, 3, 4, 4), torch.ones(4, 4))


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)])
def test_group_and_instance_norm_use_the_statistics_of_visible_cells(norm):
    norm = norm.double()
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else 4
    x, mask = torch.randn(2, 4, 6, 6, dtype=torch.float64), random_mask(2, 6, 6, keep=0.5)
    out = layer_masked(nn.Sequential(norm))(x, mask)
    for b in range(2):
        visible = mask[b, 0] > 0
        for g in range(groups):
            channels = slice(g * 4 // groups, (g + 1) * 4 // groups)
            cells = x[b, channels][:, visible]
            normalized = (x[b, channels] - cells.mean()) / torch.sqrt(cells.var(unbiased=False) + norm.eps)
            expected = normalized * norm.weight[channels, None, None] + norm.bias[channels, None, None]
            assert torch.allclose(out[b, channels][:, visible], expected[:, visible])
    full = layer_masked(nn.Sequential(norm))(x, torch.ones(6, 6))
    assert torch.allclose(full, norm(x))


def source_cells(height, width, resample):
    """For each output cell of a copying resample (padding, nearest), the index of the input cell it copies."""
    index = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)
    return resample(index).round().long()


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_copies_the_mask_of_the_cell_each_border_cell_extends(mode):
    x, mask = torch.randn(2, 3, 6, 7), (torch.rand(2, 1, 6, 7) < 0.5).float()
    widths = (2, 1, 1, 3)
    out = (
        rules.pad(F.pad, Masked(x, mask), widths, mode, 0.5)
        if mode == "constant"
        else rules.pad(F.pad, Masked(x, mask), widths, mode=mode)
    )
    assert torch.equal(out.value, F.pad(x, widths, mode=mode, **({"value": 0.5} if mode == "constant" else {})))
    # constant: the edge cell next to the border; the other modes: the cell the layer copies
    source = source_cells(6, 7, lambda index: F.pad(index, widths, mode="replicate" if mode == "constant" else mode))
    expected = mask.flatten(1)[:, source.flatten()].view(2, 1, *source.shape[-2:])
    assert torch.equal(out.mask, expected)


def test_padding_modules_and_a_full_mask_reproduce_the_layer():
    x = torch.randn(1, 2, 5, 5)
    for layer in (
        nn.ZeroPad2d(2),
        nn.ConstantPad2d((1, 0, 2, 1), 3.0),
        nn.ReflectionPad2d(1),
        nn.ReplicationPad2d(2),
        nn.CircularPad2d(1),
    ):
        masked = layer_masked(nn.Sequential(layer))
        assert torch.equal(masked(x, torch.ones(5, 5)), layer(x))
    cropped = rules.pad(F.pad, Masked(x, torch.ones(1, 1, 5, 5)), (-1, 2, 0, -2))
    assert cropped.mask.shape[-2:] == cropped.value.shape[-2:] == (3, 6)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_nearest_interpolation_copies_the_mask_of_the_cell_it_reads(mode):
    x, mask = torch.randn(1, 2, 5, 6), (torch.rand(1, 1, 5, 6) < 0.5).float()
    out = rules.interpolate(F.interpolate, Masked(x, mask), scale_factor=1.7, mode=mode)
    source = source_cells(5, 6, lambda index: F.interpolate(index, scale_factor=1.7, mode=mode))
    assert torch.equal(out.mask[0, 0], mask.flatten()[source.flatten()].view(source.shape[-2:]))
    assert torch.equal(out.value, F.interpolate(x, scale_factor=1.7, mode=mode))


@pytest.mark.parametrize("mode, span", [("bilinear", 1), ("bicubic", 3)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_smooth_interpolation_reads_neighbor_padded_taps(mode, span, align_corners):
    """Against a direct computation: each output is the sum of its taps' weights times the paper's neighbor
    padding of the input (weights read off by interpolating one-hot images), and is visible when a tap it reads
    is (bicubic: any cell of its 4x4 footprint)."""
    height, width, size = 6, 7, (11, 9)
    x, mask = (
        torch.randn(1, 2, height, width, dtype=torch.float64),
        torch.zeros(1, 1, height, width, dtype=torch.float64),
    )
    mask[..., 1:3, 2:5] = 1
    mask[..., 5, 6] = 1
    out = rules.interpolate(F.interpolate, Masked(x, mask), size=size, mode=mode, align_corners=align_corners)
    onehots = torch.eye(height * width, dtype=torch.float64).view(-1, 1, height, width)
    weights = F.interpolate(onehots, size=size, mode=mode, align_corners=align_corners)[:, 0]  # (taps, H', W')
    padded = paper_neighbor_pad(x, mask, span)
    expected = torch.einsum("thw,ct->chw", weights, padded[0].flatten(1))
    reads_visible = ((weights != 0) & (mask.flatten()[:, None, None] > 0)).any(0)
    visible = out.mask[0, 0] > 0
    assert (visible >= reads_visible).all() and visible.any()
    if mode == "bilinear":
        assert torch.equal(visible, reads_visible)
    assert torch.allclose(out.value[0][:, visible], expected[:, visible], atol=1e-9)
    full = rules.interpolate(
        F.interpolate, Masked(x, torch.ones_like(mask)), size=size, mode=mode, align_corners=align_corners
    )
    assert torch.equal(full.value, F.interpolate(x, size=size, mode=mode, align_corners=align_corners))


def test_antialiased_or_area_resampling_is_refused():
    masked = Masked(torch.randn(1, 2, 8, 8), torch.ones(1, 1, 8, 8))
    for kwargs in ({"mode": "bilinear", "antialias": True}, {"mode": "area"}):
        with pytest.raises(UnsupportedLayerError, match="interpolation mode"):
            rules.interpolate(F.interpolate, masked, scale_factor=0.5, **kwargs)


class SpatialStatistics(nn.Module):
    """ConvNeXt-V2's global response normalization (channels-last) and other statistics over space."""

    def forward(self, x):
        channels_last = x.permute(0, 2, 3, 1)
        response = channels_last.norm(p=2, dim=(1, 2), keepdim=True)
        grn = channels_last * (response / (response.mean(dim=-1, keepdim=True) + 1e-6))
        return (
            grn.permute(0, 3, 1, 2),
            x.sum((2, 3)),
            torch.linalg.vector_norm(x, ord=3, dim=(2, 3)),
            x.abs().norm(p=float("inf"), dim=(2, 3)),
            x.var((2, 3)),
            x.std((2, 3), unbiased=False),
        )


def test_sums_norms_and_variances_over_space_are_those_of_the_visible_cells():
    """Against a direct computation on the visible cells of each sample: removed cells count as the visible mean
    in sums and norms (the average pooling rule), and are left out of variances."""
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 6) < 0.4
    mask[:, :, 0, 0] = True
    grn, total, norm3, maximum, var, std = layer_masked(SpatialStatistics())(x, mask)
    for n in range(2):
        visible = x[n][:, mask[n, 0]]  # (C, visible cells)
        cells = 30
        assert torch.allclose(total[n], visible.mean(1) * cells)
        assert torch.allclose(norm3[n], (visible.abs().pow(3).mean(1) * cells) ** (1 / 3))
        assert torch.allclose(maximum[n], visible.abs().amax(1))
        assert torch.allclose(var[n], visible.var(1)) and torch.allclose(std[n], visible.std(1, unbiased=False))
        response = (visible.pow(2).mean(1) * cells).sqrt()
        expected = x[n] * (response / (response.mean() + 1e-6))[:, None, None]
        assert torch.allclose(grn[n][:, mask[n, 0]], expected[:, mask[n, 0]])
    full = layer_masked(SpatialStatistics())(x, torch.ones(5, 6))
    for got, reference in zip(full, SpatialStatistics()(x)):
        assert torch.allclose(got, reference, rtol=1e-12, atol=1e-12)


def test_max_over_a_spatial_dimension_takes_the_visible_cells_and_their_indices():
    class Rows(nn.Module):
        def forward(self, x):
            values, indices = torch.max(x, dim=3)
            return values + indices.to(x.dtype), x.min(dim=1, keepdim=True)[0]

    x, mask = torch.randn(2, 3, 5, 6, dtype=torch.float64), random_mask(2, 5, 6, keep=0.5)
    values, indices = torch.where(mask > 0, x, -torch.inf).max(dim=3)
    visible = mask.amax(3) > 0
    rows, channel_min = layer_masked(Rows())(x, mask)
    assert torch.equal(rows, torch.where(visible, values + indices, 0))
    assert torch.equal(channel_min, x.min(dim=1, keepdim=True)[0] * mask)  # over channels: as it is, per cell


def test_max_of_two_tensors_is_per_cell_and_max_of_everything_is_the_visible_maximum():
    class Both(nn.Module):
        def forward(self, x):
            return x.max(x * 0.5 + 1) + x.max()

    x, mask = torch.randn(2, 3, 5, 5, dtype=torch.float64), random_mask(2, 5, 5)
    overall = torch.where(mask > 0, x, -torch.inf).max()  # over the whole batch, as x.max() is
    expected = (torch.maximum(x, x * 0.5 + 1) + overall) * mask
    assert torch.allclose(layer_masked(Both())(x, mask), expected, atol=1e-12)


def test_repeat_interleave_repeats_the_mask_along_space_and_keeps_it_along_the_batch():
    class Repeat(torch.nn.Module):
        def forward(self, x):
            return x.repeat_interleave(2, dim=3) + x.repeat_interleave(2, dim=0)[::2].repeat_interleave(2, dim=3)

    x = torch.randn(2, 3, 4, 4)
    mask = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    out = layer_masked(Repeat())(x, mask)
    expected = 2 * torch.where(mask > 0, x, 0).repeat_interleave(2, dim=3)
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(UnsupportedLayerError, match="without dim"):
        layer_masked(type("Flat", (torch.nn.Module,), {"forward": lambda self, x: x.repeat_interleave(2)})())(x, mask)


def _contributors_visible(mask, kernel, stride, padding, dilation, output_padding):
    """Output mask of a transposed convolution by loops: 1 where some input cell a tap lands from is visible."""
    n, _, h, w = mask.shape
    out_h = (h - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    out_w = (w - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    out = torch.zeros(n, 1, out_h, out_w)
    for b, i, j, a, c in itertools.product(range(n), range(h), range(w), range(kernel), range(kernel)):
        y, x = i * stride - padding + a * dilation, j * stride - padding + c * dilation
        if 0 <= y < out_h and 0 <= x < out_w and mask[b, 0, i, j] > 0:
            out[b, 0, y, x] = 1
    return out


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, output_padding",
    [(2, 2, 0, 1, 0), (3, 2, 1, 1, 1), (4, 2, 1, 1, 0), (3, 1, 1, 2, 0), (5, 3, 2, 1, 2)],
)
def test_transposed_convolution_marks_outputs_a_visible_cell_reaches_and_reads_nothing_removed(
    kernel, stride, padding, dilation, output_padding
):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 3, kernel, stride, padding, output_padding, dilation=dilation).double().eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 1).double(), layer).eval()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    mask = (torch.rand(2, 1, 7, 9) < 0.4).double()
    mask[:, :, 0, 0] = 1
    masked = layer_masked(model)
    with torch.no_grad():
        out, out_mask = masked(x, mask, return_mask=True)
        assert torch.allclose(masked(x, torch.ones_like(mask)), model(x), atol=1e-12)
        assert torch.equal(masked(torch.where(mask > 0, x, torch.nan), mask), out)
        visible = out_mask.expand_as(out) > 0
        # enough rings: padding every removed cell (50 rings) changes no visible output
        features = model[0](x)
        everywhere = layer(neighbor_pad(features, mask, 50))
        assert torch.allclose(out[visible], everywhere[visible], atol=1e-12)
        if kernel <= stride:  # each output sums one input cell: the visible outputs are the layer's own
            assert torch.allclose(out[visible], model(x)[visible], atol=1e-12)
    expected = _contributors_visible(mask, kernel, stride, padding, dilation, output_padding)
    assert torch.equal(out_mask.double(), expected.double())


def test_a_functional_transposed_convolution_takes_the_same_rule():
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, 3)

    class Functional(nn.Module):
        def forward(self, x):
            return F.conv_transpose2d(x, weight, None, 2, 1, 1)

    x, mask = torch.randn(1, 3, 6, 6), (torch.rand(1, 1, 6, 6) < 0.5).float()
    by_module = nn.ConvTranspose2d(3, 2, 3, 2, 1, 1, bias=False)
    by_module.weight.data.copy_(weight)
    with torch.no_grad():
        expected = layer_masked(by_module)(x, mask, return_mask=True)
        for capture in ("fx", "export"):
            got = layer_masked(Functional(), capture=capture)(x, mask, return_mask=True)
            assert torch.allclose(got[0], expected[0], atol=1e-6) and torch.equal(got[1], expected[1])
