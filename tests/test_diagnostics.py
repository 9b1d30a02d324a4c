"""Maskers, segmenters and the missingness-bias diagnostics (supplementary section 7)."""

import math

import pytest
import torch
from torch import nn

from captum_layermask import LayerMaskError, MaskShapeError, layer_masked
from captum_layermask.evaluation.diagnostics import linearity, magnitude_curve, output_collapse
from captum_layermask.evaluation.maskers import (
    BlurFill,
    ConstantFill,
    LayerMasking,
    MeanColourFill,
    black,
    get_masker,
    grey,
)
from captum_layermask.evaluation.segmentation import SLIC, Patches, segment_images

from .helpers import patch_masks
from .helpers import small_classifier as small_cnn


def pixelwise_model(channels=3, classes=4):
    """Acts on each pixel separately, then global average pooling: linear in masking under layer masking."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


# --- maskers ---------------------------------------------------------------------------------------------------


def test_fills_replace_exactly_the_removed_pixels():
    model, x, mask = small_cnn(), torch.randn(4, 3, 32, 32), patch_masks(4, 32, 32, 8)
    assert torch.equal(get_masker("grey")(model, x, mask), model(x * mask))
    fill = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(get_masker("black")(model, x, mask), model(torch.where(mask, x, fill)))
    custom = black(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.equal(custom(model, x, mask), model(torch.where(mask, x, torch.tensor(-2.0))))
    means = x.mean((2, 3), keepdim=True)
    assert torch.equal(MeanColourFill()(model, x, mask), model(torch.where(mask, x, means)))


def test_blur_fill_keeps_a_constant_image_constant_and_smooths_noise():
    constant = torch.full((1, 3, 24, 24), 0.7)
    assert torch.allclose(BlurFill(sigma=2).fill_values(constant, None), constant, atol=1e-6)
    noise = torch.randn(1, 3, 24, 24)
    assert BlurFill(sigma=2).fill_values(noise, None).std() < 0.5 * noise.std()


def test_layer_masker_is_the_layer_masked_model_and_ignores_removed_pixels():
    model, x, mask = small_cnn(), torch.randn(4, 3, 32, 32), patch_masks(4, 32, 32, 8)
    expected = layer_masked(model)(x, mask)
    assert torch.equal(get_masker("layer")(model, x, mask), expected)
    assert torch.equal(LayerMasking()(model, torch.where(mask, x, 1e4), mask), expected)
    masked = layer_masked(model)
    assert torch.equal(get_masker("layer")(masked, x, mask), expected)  # an already layer-masked model as it is


def test_a_callable_is_a_masker_and_bad_names_are_refused():
    seen = []
    masker = get_masker(lambda model, x, mask: seen.append(mask) or model(x))
    masker(small_cnn(), torch.randn(2, 3, 16, 16), torch.ones(2, 1, 16, 16, dtype=torch.bool))
    assert len(seen) == 1
    with pytest.raises(LayerMaskError, match="unknown masker 'gray'"):
        get_masker("gray")
    with pytest.raises(LayerMaskError, match="must be a name"):
        get_masker(3)
    assert grey().name == "grey" and ConstantFill([1, 2, 3]).value.shape == (1, 3, 1, 1)


# --- segmenters ------------------------------------------------------------------------------------------------


def test_patch_segments_and_precomputed_ids():
    images = torch.randn(2, 3, 40, 48)
    segments = segment_images(images, "patches")
    assert segments.shape == (2, 40, 48) and int(segments.max()) == 3 * 3 - 1
    assert torch.equal(segments[0, :16, :16], torch.zeros(16, 16, dtype=torch.long))
    relabelled = segment_images(images, segments * 10 + 5)
    assert torch.equal(relabelled, segments)
    with pytest.raises(MaskShapeError, match="segments must have shape"):
        segment_images(images, segments[:, :10])
    assert torch.equal(
        segment_images(images, Patches(8))[0], segment_images(images, lambda image: Patches(8)(image))[0]
    )


def test_slic_undoes_the_model_normalisation():
    raw = torch.rand(1, 3, 4, 4).repeat_interleave(12, 2).repeat_interleave(12, 3)  # 16 coloured blocks
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    normalised = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    on_raw = segment_images(raw, SLIC(n_segments=20, mean=(0, 0, 0), std=(1, 1, 1)))
    assert torch.equal(segment_images(normalised, SLIC(n_segments=20, mean=mean, std=std)), on_raw)
    assert 8 <= int(on_raw.max()) + 1 <= 40


# --- diagnostics -----------------------------------------------------------------------------------------------


def test_a_pixelwise_model_is_exactly_linear_in_masking_under_layer_masking():
    model, images = pixelwise_model(), torch.randn(3, 3, 32, 32)
    for patch in (16, 8, 4):
        assert linearity(model, images, patch, "layer", show_progress=False) == pytest.approx(1.0, abs=1e-5)
    assert linearity(model, images, 8, "grey", show_progress=False) < 0.999  # a fill adds the fill's features


@torch.no_grad()
def test_linearity_is_the_cosine_of_features_and_their_patch_sum():
    model, images = small_cnn(), torch.randn(2, 3, 16, 16)
    features = lambda x, mask: model[:-1](torch.where(mask, x, 0.0))  # noqa: E731  (input of the last Linear)
    whole = features(images, torch.ones(1, 1, 16, 16, dtype=torch.bool))
    patches = Patches(8)(images[0])
    summed = sum(features(images, (patches == i)[None, None]) for i in range(4))
    expected = torch.nn.functional.cosine_similarity(whole, summed, dim=1).mean()
    assert linearity(model, images, 8, "grey", batch_size=3, show_progress=False) == pytest.approx(
        float(expected), abs=1e-5
    )


def test_magnitude_is_constant_under_layer_masking_for_a_constant_image():
    model = pixelwise_model()
    images = torch.full((2, 3, 32, 32), 0.3)
    curve = magnitude_curve(model, images, [4, 8, 16, 32], "layer", show_progress=False)
    assert curve.sizes == [4, 8, 16, 32] and all(v == pytest.approx(curve.values[-1], rel=1e-5) for v in curve.values)
    grey_curve = magnitude_curve(model, images, [4, 32], "grey", show_progress=False)
    assert grey_curve.values[0] != pytest.approx(grey_curve.values[1], rel=1e-3)


def test_output_collapse_is_zero_at_full_size_and_compares_every_pair():
    model, images = small_cnn(), torch.randn(4, 3, 32, 32)
    curve = output_collapse(model, images, [8, 16, 32], "layer", show_progress=False)
    assert [d.shape for d in curve.per_image] == [(6,)] * 3  # 4 images: 6 pairs
    assert curve.values[-1] == pytest.approx(0.0, abs=1e-4)  # resizing to the full size changes nothing
    assert all(math.isfinite(v) for v in curve.values)
    with pytest.raises(ValueError, match="at least 2"):
        output_collapse(model, images[:1], [8], "layer", show_progress=False)
    with pytest.raises(ValueError, match="between 1 and the image side"):
        output_collapse(model, images, [64], "layer", show_progress=False)


@torch.no_grad()
def test_feature_layer_can_be_named_or_the_output_and_bad_ones_are_refused():
    model, images = small_cnn(), torch.randn(2, 3, 16, 16)
    auto = magnitude_curve(model, images, [16], "grey", show_progress=False).values[0]
    named = magnitude_curve(model, images, [16], "grey", feature_layer="10", show_progress=False).values[0]
    assert auto == pytest.approx(named)
    assert auto == pytest.approx(float(model[:-1](images).norm(dim=1).mean()), rel=1e-5)
    output = magnitude_curve(model, images, [16], "grey", feature_layer="output", show_progress=False).values[0]
    assert output == pytest.approx(float(model(images).norm(dim=1).mean()), rel=1e-5)
    with pytest.raises(LayerMaskError, match="no nn.Linear runs"):
        magnitude_curve(
            nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(),
            images,
            [16],
            "grey",
            show_progress=False,
        )
    with pytest.raises(LayerMaskError, match="features must be"):
        magnitude_curve(model, images, [16], "grey", feature_layer="4", show_progress=False)
    with pytest.raises(LayerMaskError, match="no submodule 'head'"):
        magnitude_curve(model, images, [16], "grey", feature_layer="head", show_progress=False)


def test_diagnostics_leave_no_hook_on_the_model():
    model, images = small_cnn(), torch.randn(2, 3, 16, 16)
    linearity(model, images, 8, "layer", show_progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "name, classifier",
    [
        ("resnet18", "fc"),
        ("vgg11_bn", "classifier.6"),
        ("mobilenet_v3_small", "classifier.3"),
        ("densenet121", "classifier"),
        ("efficientnet_b0", "classifier.1"),
    ],
)
def test_the_classifier_is_found_in_torchvision_models(name, classifier):
    import torchvision

    from captum_layermask.evaluation._batching import FeatureReader

    model = torchvision.models.get_model(name, num_classes=10).eval()
    assert FeatureReader(model, None, torch.randn(1, 3, 64, 64)).module is model.get_submodule(classifier)
    curve = magnitude_curve(model, torch.randn(2, 3, 64, 64), [32, 64], "layer", show_progress=False)
    assert all(math.isfinite(v) and v > 0 for v in curve.values)


def test_a_model_without_linear_layer_asks_for_a_feature_layer():
    import torchvision

    model = torchvision.models.squeezenet1_1(num_classes=10).eval()
    with pytest.raises(LayerMaskError, match="pass feature_layer="):
        linearity(model, torch.randn(1, 3, 64, 64), 32, "grey", show_progress=False)
    assert (
        linearity(model, torch.randn(1, 3, 64, 64), 32, "layer", feature_layer="output", show_progress=False)
        <= 1.0 + 1e-6
    )


def test_empty_batches_and_empty_patches_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(MaskShapeError, match="at least one image"):
        linearity(model, torch.randn(0, 3, 16, 16), 8, show_progress=False)
    with pytest.raises(ValueError, match="patch size must be an int of at least 1"):
        linearity(model, torch.randn(2, 3, 16, 16), 0, show_progress=False)
    with pytest.raises(MaskShapeError, match="must be integers"):
        segment_images(torch.randn(1, 3, 4, 4), torch.rand(1, 4, 4))
