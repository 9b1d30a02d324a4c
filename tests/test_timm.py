"""timm models under layer masking: the rules of timm's layers against direct computations, one model per family
with the invariants of tests/test_torchvision.py, Captum and ONNX on timm models, and (slow) the whole zoo."""

import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_layermask import UnsupportedLayerError, layer_masked

from .helpers import paper_neighbor_pad, visible_any

timm = pytest.importorskip("timm")
from timm.layers import CondConv2d, Conv2dSame, EcaModule  # noqa: E402
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame  # noqa: E402
from timm.layers.std_conv import StdConv2dSame  # noqa: E402
from timm.models.vgg import ConvMlp  # noqa: E402

from . import timm_zoo  # noqa: E402

REFUSED = pathlib.Path(__file__).parent / "data" / "timm_refused.json"


def random_mask(n, h, w, keep=0.5):
    return (torch.rand(n, 1, h, w) < keep).double()


def same_padding(size, kernel, stride, dilation=1):
    """TensorFlow's "same" padding of one dimension, (before, after), written from its definition."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


# ---------------------------------------------------------------------------------------------------------------
# rules of timm's leaves against direct computations


@pytest.mark.parametrize("layer_type", [Conv2dSame, StdConv2dSame])
@pytest.mark.parametrize("stride, dilation", [(2, 1), (1, 2), (2, 2)])
def test_same_padded_convolution_is_the_convolution_rule_with_tensorflow_padding(layer_type, stride, dilation):
    layer = layer_type(4, 6, 3, stride=stride, dilation=dilation, padding="same" if layer_type is StdConv2dSame else 0)
    layer = layer.double().eval()
    x, mask = torch.randn(2, 4, 9, 10, dtype=torch.float64), random_mask(2, 9, 10)
    top, bottom = same_padding(9, 3, stride, dilation)
    left, right = same_padding(10, 3, stride, dilation)
    pad = (left, right, top, bottom)
    weight = layer.weight if layer_type is Conv2dSame else _std(layer)
    padded = F.pad(paper_neighbor_pad(x, mask, 2 * dilation + 1), pad)
    kept = visible_any(F.pad(mask, pad), (3, 3), (stride, stride), (0, 0), (dilation, dilation))
    expected = F.conv2d(padded, weight, layer.bias, stride, 0, dilation) * kept
    masked = layer_masked(nn.Sequential(layer))
    assert torch.allclose(masked(x, mask), expected, atol=1e-9)
    assert torch.allclose(masked(x, torch.ones_like(mask)), layer(x), atol=1e-9)


def _std(layer):
    """StdConv2d's weight: each output filter standardised (zero mean, unit variance, biased)."""
    weight = layer.weight.reshape(layer.out_channels, -1)
    mean, var = weight.mean(1, keepdim=True), weight.var(1, unbiased=False, keepdim=True)
    return ((weight - mean) / torch.sqrt(var + layer.eps)).reshape_as(layer.weight)


def _pool_windows(x, mask, kernel=3, stride=2):
    """(sample, i, j, in-image cells, visible values) of each window of a "same"-padded pooling."""
    h, w = x.shape[-2:]
    top, _ = same_padding(h, kernel, stride)
    left, _ = same_padding(w, kernel, stride)
    for b in range(len(x)):
        for i in range(math.ceil(h / stride)):
            for j in range(math.ceil(w / stride)):
                rows = range(i * stride - top, i * stride - top + kernel)
                cols = range(j * stride - left, j * stride - left + kernel)
                cells = [(r, c) for r in rows for c in cols if 0 <= r < h and 0 <= c < w]
                visible = [x[b, :, r, c] for r, c in cells if mask[b, 0, r, c] > 0]
                yield b, i, j, cells, torch.stack(visible) if visible else None


def test_same_padded_max_pool_is_the_maximum_of_the_visible_cells():
    x, mask = torch.randn(2, 3, 9, 10, dtype=torch.float64), random_mask(2, 9, 10, keep=0.3)
    out = layer_masked(nn.Sequential(MaxPool2dSame(3, 2)))(x, mask)
    for b, i, j, _, visible in _pool_windows(x, mask):
        expected = visible.amax(0) if visible is not None else torch.zeros(3, dtype=torch.float64)
        assert torch.equal(out[b, :, i, j], expected)


def test_same_padded_avg_pool_counts_removed_cells_as_the_visible_mean():
    x, mask = torch.randn(2, 3, 9, 10, dtype=torch.float64), random_mask(2, 9, 10, keep=0.4)
    out = layer_masked(nn.Sequential(AvgPool2dSame(3, 2)))(x, mask)
    for b, i, j, cells, visible in _pool_windows(x, mask):
        # the visible mean, scaled as the layer scales by the zeros of its border (count_include_pad)
        expected = visible.mean(0) * len(cells) / 9 if visible is not None else torch.zeros(3, dtype=torch.float64)
        assert torch.allclose(out[b, :, i, j], expected, atol=1e-12)


class _Routed(nn.Module):
    """CondConv as timm's EfficientNet-CondConv uses it: routing weights from the pooled input."""

    def __init__(self):
        super().__init__()
        self.route = nn.Linear(4, 3)
        self.conv = CondConv2d(4, 6, 3, padding=1, num_experts=3, bias=True)

    def forward(self, x):
        return self.conv(x, torch.sigmoid(self.route(x.mean((2, 3)))))


def test_conditional_convolution_is_each_samples_convolution_with_its_visible_routing():
    model = _Routed().double().eval()
    x, mask = torch.randn(2, 4, 8, 8, dtype=torch.float64), random_mask(2, 8, 8)
    out = layer_masked(model)(x, mask)
    for b in range(2):
        visible_mean = (x[b] * mask[b]).sum((1, 2)) / mask[b].sum()
        routing = torch.sigmoid(model.route(visible_mean))
        weight = (routing @ model.conv.weight).view(6, 4, 3, 3)
        bias = routing @ model.conv.bias
        kept = visible_any(mask[b : b + 1], (3, 3), (1, 1), (1, 1), (1, 1))
        expected = F.conv2d(paper_neighbor_pad(x[b : b + 1], mask[b : b + 1], 3), weight, bias, padding=1) * kept
        assert torch.allclose(out[b : b + 1], expected, atol=1e-9)


@pytest.mark.parametrize("size", [9, 5])
def test_vgg_conv_mlp_is_its_parts_after_enlarging_a_small_input(size):
    head = ConvMlp(4, 5, kernel_size=7, drop_rate=0.0).double().eval()
    parts = [head.fc1, head.act1, head.drop, head.fc2, head.act2]
    reference = nn.Sequential(*([nn.AdaptiveAvgPool2d(7)] if size < 7 else []), *parts)
    x, mask = torch.randn(2, 4, size, size, dtype=torch.float64), random_mask(2, size, size)
    assert torch.allclose(layer_masked(nn.Sequential(head))(x, mask), layer_masked(reference)(x, mask), atol=1e-12)


def test_eca_convolves_the_visible_channel_means_along_channels():
    eca = EcaModule(channels=8).double().eval()
    x, mask = torch.randn(2, 8, 6, 6, dtype=torch.float64), random_mask(2, 6, 6)
    means = (x * mask).sum((2, 3)) / mask.sum((2, 3))
    gate = torch.sigmoid(eca.conv(means.unsqueeze(1))).view(2, 8, 1, 1)
    assert torch.allclose(layer_masked(nn.Sequential(eca))(x, mask), x * gate * mask, atol=1e-12)


def test_a_one_dimensional_convolution_over_positions_is_refused():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 3)

        def forward(self, x):
            return self.conv(x.flatten(2))

    with pytest.raises(UnsupportedLayerError, match="1-D convolution"):
        layer_masked(Rows())(torch.randn(1, 3, 4, 4), torch.ones(1, 1, 4, 4))


def test_global_response_norm_takes_the_norm_over_visible_cells():
    grn = GlobalResponseNorm(6, channels_last=False).double().eval()
    nn.init.normal_(grn.weight)
    nn.init.normal_(grn.bias)
    x, mask = torch.randn(2, 6, 5, 5, dtype=torch.float64), random_mask(2, 5, 5)
    # the L2 norm over space, each removed cell counting as the visible mean of x^2 (the sum rule)
    norm = ((x**2 * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True) * 25).sqrt()
    normalized = norm / (norm.mean(1, keepdim=True) + grn.eps)
    expected = x + grn.bias.view(1, -1, 1, 1) + grn.weight.view(1, -1, 1, 1) * x * normalized
    assert torch.allclose(layer_masked(nn.Sequential(grn))(x, mask), expected * mask, atol=1e-12)


def test_blur_pool_neighbor_pads_then_blurs_with_its_reflected_border():
    blur = timm.layers.BlurPool2d(channels=3, filt_size=3, stride=2).double().eval()
    x, mask = torch.randn(2, 3, 10, 10, dtype=torch.float64), torch.ones(2, 1, 10, 10, dtype=torch.float64)
    mask[:, :, 3:7, 2:6] = 0  # away from the border, whose reflection reads only visible cells
    kept = visible_any(mask, (3, 3), (2, 2), (1, 1), (1, 1))
    expected = blur(paper_neighbor_pad(x, mask, 3)) * kept
    assert torch.allclose(layer_masked(nn.Sequential(blur))(x, mask), expected, atol=1e-12)


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax", "catavgmax", "fast"])
def test_select_adaptive_pool_pools_the_visible_cells(pool_type):
    pool = timm.layers.SelectAdaptivePool2d(pool_type=pool_type, flatten=True).eval()
    x, mask = torch.randn(2, 5, 6, 6, dtype=torch.float64), random_mask(2, 6, 6)
    mean = (x * mask).sum((2, 3)) / mask.sum((2, 3))
    maximum = torch.where(mask > 0, x, -torch.inf).amax((2, 3))
    expected = {
        "avg": mean,
        "fast": mean,
        "max": maximum,
        "avgmax": (mean + maximum) / 2,
        "catavgmax": torch.cat([mean, maximum], 1),
    }[pool_type]
    assert torch.allclose(layer_masked(nn.Sequential(pool))(x, mask), expected, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CbamModule(8),
        lambda: timm.layers.EffectiveSEModule(8),
        lambda: timm.layers.SplitAttn(8, 8, radix=2),
        lambda: timm.layers.SelectiveKernel(8, 8),
        lambda: timm.layers.EvoNorm2dS0(8, groups=4),
        lambda: timm.layers.EvoNorm2dB0(8),
        lambda: timm.layers.GroupNormAct(8, 4),
    ],
    ids=["cbam", "effective-se", "split-attn", "selective-kernel", "evonorm-s0", "evonorm-b0", "groupnorm-act"],
)
def test_attention_and_norm_blocks_read_only_visible_cells(make):
    torch.manual_seed(0)
    block = make().double().eval()
    x, mask = torch.randn(2, 8, 8, 8, dtype=torch.float64), random_mask(2, 8, 8)
    masked = layer_masked(nn.Sequential(block))
    assert torch.allclose(masked(x, torch.ones_like(mask)), block(x), atol=1e-6)  # EvoNorm's statistics: float32
    out = masked(x, mask)
    assert torch.equal(masked(torch.where(mask > 0, x, torch.nan), mask), out)
    assert not torch.allclose(out, block(x) * (out != 0))  # statistics of the visible cells, not of all


# ---------------------------------------------------------------------------------------------------------------
# one model per family, with the invariants of tests/test_torchvision.py

FAMILIES = [
    "resnet18d",
    "resnetblur18",
    "seresnext26d_32x4d",
    "ecaresnet26t",
    "skresnet18",
    "resnest14d",
    "res2net50_14w_8s",
    "resnetv2_50x1_bit",
    "tf_efficientnet_b0",
    "tf_mixnet_s",
    "efficientnet_cc_b0_4e",
    "mobilenetv3_small_050",
    "mobilenetv4_conv_small",
    "regnety_002",
    "convnext_atto",
    "convnextv2_atto",
    "dm_nfnet_f0",
    "eca_nfnet_l0",
    "nf_regnet_b0",
    "vgg11_bn",
    "densenet121",
    "dla34",
    "dpn48b",
    "cspresnet50",
    "hrnet_w18_small",
    "ghostnetv2_100",
    "hgnetv2_b0",
    "tresnet_m",
    "rexnet_100",
    "repvit_m1",
    "fastvit_t8",
    "gernet_s",
    "xception41",
    "inception_v3",
    "mambaout_femto",
    "starnet_s050",
    "poolformerv2_s12",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    assert timm_zoo.classify(name) == (True, "")
    timm_zoo.check(name)


# ---------------------------------------------------------------------------------------------------------------
# Captum and ONNX on timm models


def _timm_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        timm_zoo._randomize_norm_statistics(model)
    return model


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "convnextv2_atto"])
def test_lime_with_layer_mask_sees_exactly_the_layer_masked_outputs(name):
    from captum._utils.models.linear_model import SkLearnLinearRegression
    from captum.attr import Lime

    from captum_layermask import LayerMask
    from captum_layermask.integrations.captum import mask_from_baseline

    masked = layer_masked(_timm_model(name))
    image = torch.randn(1, 3, 64, 64)
    segments = torch.arange(16).view(1, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    seen = []

    def forward(batch):
        out = masked(batch)
        for i in range(len(batch)):
            keep = mask_from_baseline(batch[i : i + 1])
            keep = torch.ones(1, 1, 64, 64, dtype=torch.bool) if keep is None else keep
            with torch.no_grad():
                assert torch.allclose(out[i], masked(image, keep)[0], atol=1e-5)
            seen.append(keep)
        return out

    lime = Lime(forward, interpretable_model=SkLearnLinearRegression())  # random weights: Lasso's default zeroes all
    attribution = lime.attribute(
        image, target=0, feature_mask=segments, baselines=LayerMask(), n_samples=12, perturbations_per_eval=4
    )
    assert len(seen) >= 12 and attribution.isfinite().all() and attribution.abs().sum() > 0
    assert any(not keep.all() for keep in seen)


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "convnextv2_atto"])
def test_onnxruntime_reproduces_the_layer_masked_timm_model(name, tmp_path):
    import numpy as np
    import onnxruntime

    from onnx_export import export_masked
    from onnx_export.export import verification_masks

    model = _timm_model(name)
    path = export_masked(model, tmp_path / f"{name}.onnx", input_shape=(2, 3, 64, 64))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    masked, image = layer_masked(model), torch.randn(3, 3, 64, 64)
    for mask in verification_masks(3, 64, 64, seed=3).values():
        got = session.run(["logits"], {"image": image.numpy(), "mask": mask.numpy()})[0]
        with torch.no_grad():
            expected = masked(image, mask).numpy()
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# ---------------------------------------------------------------------------------------------------------------
# the whole zoo (make test-slow): every convolutional architecture converts, except the documented refusals


@pytest.mark.slow
def test_every_convolutional_architecture_converts_or_is_a_documented_refusal():
    results = timm_zoo.sweep(timm.list_models())
    failed = {name: entry["detail"] for name, entry in results.items() if entry["result"] == "failed"}
    refused = {name for name, entry in results.items() if entry["result"] == "refused"}
    assert not failed
    assert refused == set(json.loads(REFUSED.read_text()))


OTHER = pathlib.Path(__file__).parent / "data" / "timm_other.jsonl"
"""The sweep of the architectures that are not convolutional (``python -m tests.timm_zoo --all --record ...``)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(timm_zoo.read_record(OTHER)) if OTHER.exists() else [])
def test_each_other_architecture_gives_its_recorded_result(name):
    recorded = timm_zoo.read_record(OTHER)[name]
    assert timm_zoo._outcome(name, "other")["result"] == recorded["result"]
