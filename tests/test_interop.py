"""shap, lime, Quantus and ROAD adapters: every model call a tool makes is the layer-masked model on the mask the
tool meant, checked call by call against a direct ``layer_masked(model)(x, mask)``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_layermask import LayerMaskError, layer_masked
from captum_layermask.interop import ArrayModel, ChannelSplitError, NaNMasked, visible_from_nan

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def small_cnn(channels=3, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes),
    ).eval()  # fmt: skip


def normalize(pixels):
    """(N, H, W, C) pixel values in [0, 1] -> model inputs (N, C, H, W)."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def direct(masked, x, keep):
    """The reference: the layer-masked model called with the mask, no tool in between."""
    with torch.no_grad():
        return masked(x, torch.as_tensor(np.asarray(keep)).bool()[:, None]).float()


@pytest.fixture
def pixels():
    return np.random.default_rng(0).random((2, 12, 12, 3)).astype(np.float32)


def test_nan_pixels_are_the_mask_and_a_split_pixel_is_refused():
    x = torch.randn(2, 3, 6, 6)
    x[0, :, 1, 2] = float("nan")
    assert torch.equal(visible_from_nan(x)[:, 0], ~torch.isnan(x).all(1))
    masked = layer_masked(small_cnn())
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, 0, 1, 2] = False
    with torch.no_grad():
        assert torch.allclose(NaNMasked(masked)(x), masked(torch.nan_to_num(x), keep), atol=1e-6)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ChannelSplitError, match=r"1 pixel\(s\) are NaN in some channels.*hold NaN values of their own"):
        NaNMasked(masked)(x)
    for adapter in (NaNMasked, ArrayModel):
        with pytest.raises(LayerMaskError, match="pass layer_masked"):
            adapter(small_cnn())
    assert not NaNMasked(masked).training  # Quantus refuses models in training mode


# --- shap ------------------------------------------------------------------------------------------------------


class Recording:
    """Wraps a model function and records each call's arguments and outputs."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, *args):
        out = self.function(*args)
        self.calls.append((*(np.array(a, copy=True) for a in args), out))
        return out


@pytest.mark.parametrize("explainer", ["partition", "permutation"])
def test_shap_calls_the_layer_masked_model_on_each_mask_it_builds(pixels, explainer):
    shap = pytest.importorskip("shap")
    from captum_layermask.interop.shap import LayerMaskImage

    class RecordingMasker(LayerMaskImage):
        masks = []

        def __call__(self, mask, x):
            self.masks.append(np.zeros(144, bool) if mask is None else np.array(mask, dtype=bool))
            return super().__call__(mask, x)

    masked = layer_masked(small_cnn())
    model = Recording(ArrayModel(masked, mean=MEAN, std=STD, output="logits"))
    masker = RecordingMasker((12, 12, 3))
    kind = shap.explainers.Partition if explainer == "partition" else shap.explainers.Permutation
    values = kind(model, masker)(pixels, max_evals=60 if explainer == "partition" else 300, batch_size=50)
    assert values.values.shape == (2, 12, 12, 1, 3)  # (images, H, W, 1, classes): one value per pixel
    images = np.concatenate([c[0] for c in model.calls])
    keeps = np.concatenate([c[1] for c in model.calls])
    outputs = np.concatenate([c[2] for c in model.calls])
    assert np.array_equal(keeps.reshape(len(keeps), -1), np.stack(masker.masks))  # the masks shap meant, in order
    assert all(np.array_equal(image, pixels[0]) or np.array_equal(image, pixels[1]) for image in images)
    assert np.allclose(outputs, direct(masked, normalize(images), keeps).numpy(), atol=1e-5)
    if explainer == "permutation":  # shap's efficiency: values sum to f(x) - f(nothing visible)
        full = direct(masked, normalize(pixels), np.ones((2, 12, 12), bool)).numpy()
        assert np.allclose(values.values.sum((1, 2, 3)) + values.base_values, full, atol=1e-4)
        import matplotlib

        matplotlib.use("Agg")
        shap.image_plot(values, show=False)  # shap's own plot takes the values as they are


def test_shap_elementwise_masks_that_split_pixels_are_refused(pixels):
    shap = pytest.importorskip("shap")
    model = ArrayModel(layer_masked(small_cnn()), mean=MEAN, std=STD)
    with pytest.raises(ChannelSplitError):  # shap's own Image masker, NaN fill: one feature per value
        shap.explainers.Permutation(model, shap.maskers.Image(np.nan, (12, 12, 3)))(pixels[:1], max_evals=900)
    from captum_layermask.interop.shap import LayerMaskImage

    with pytest.raises(LayerMaskError, match=r"built for images of shape \(12, 12, 3\)"):
        LayerMaskImage((12, 12, 3))(None, pixels[0, :8])


# --- lime ------------------------------------------------------------------------------------------------------


def grid_segments(image):
    return np.arange(16).reshape(4, 4).repeat(3, 0).repeat(3, 1)


def test_lime_evaluates_the_layer_masked_model_on_each_sample(pixels):
    lime_image = pytest.importorskip("lime.lime_image")
    from captum_layermask.interop.lime import lime_image_arguments

    masked = layer_masked(small_cnn())
    arguments = lime_image_arguments(masked, mean=MEAN, std=STD, batch_size=7)
    ours = Recording(arguments["classifier_fn"])
    meant = Recording(lambda images: np.full((len(images), 3), 1 / 3))
    for classifier, hide_color in ((ours, arguments["hide_color"]), (meant, 7.5)):  # the same seeded samples
        explainer = lime_image.LimeImageExplainer(random_state=0)
        explainer.explain_instance(
            pixels[0].astype(np.float64), classifier, hide_color=hide_color, segmentation_fn=grid_segments,
            top_labels=1, num_samples=40, batch_size=7,
        )  # fmt: skip
    images = np.concatenate([c[0] for c in ours.calls])
    removed = (np.concatenate([c[0] for c in meant.calls]) == 7.5).all(-1)  # what lime meant to remove
    assert len(images) == 40 and removed[1:].any()
    ids = grid_segments(None)
    assert all(len(np.unique(r[ids == s])) == 1 for r in removed for s in range(16))  # whole superpixels
    assert np.array_equal(np.isnan(images).all(-1), removed)
    expected = F.softmax(direct(masked, normalize(np.nan_to_num(images)), ~removed), 1).numpy()
    assert np.allclose(np.concatenate([c[1] for c in ours.calls]), expected, atol=1e-6)
    with pytest.raises(LayerMaskError, match="pass layer_masked"):
        lime_image_arguments(small_cnn())


# --- Quantus ---------------------------------------------------------------------------------------------------


class ModelCalls:
    """Records the input and output of every call of a module (a forward hook)."""

    def __init__(self, module):
        self.inputs, self.outputs = [], []
        module.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.inputs.append(args[0].clone())
        self.outputs.append(output)


def quantus_metric(name, perturbation):
    quantus = pytest.importorskip("quantus")
    common = dict(disable_warnings=True, display_progressbar=False, perturb_func=perturbation)
    if perturbation is None:
        common.pop("perturb_func")
        common["perturb_baseline"] = 7.5  # a constant nothing else holds: the reference run's fill
    if name == "pixel_flipping":
        return quantus.PixelFlipping(features_in_step=3 * 12, **common)
    if name == "region_perturbation":
        return quantus.RegionPerturbation(patch_size=4, regions_evaluation=4, order="morf", **common)
    return quantus.Selectivity(patch_size=4, **common)


@pytest.mark.parametrize("name", ["pixel_flipping", "region_perturbation", "selectivity"])
def test_quantus_metrics_call_the_layer_masked_model_on_what_they_remove(pixels, name):
    pytest.importorskip("quantus")
    from captum_layermask.interop.quantus import LayerMaskRemoval

    net = small_cnn()
    masked = layer_masked(net)
    x = normalize(pixels).numpy()
    a = np.random.default_rng(1).random((2, 1, 12, 12)).astype(np.float32)
    y = np.array([0, 2])
    ours, reference = NaNMasked(masked), small_cnn()
    ours_calls, reference_calls = ModelCalls(ours), ModelCalls(reference)
    scores = quantus_metric(name, LayerMaskRemoval())(model=ours, x_batch=x, y_batch=y, a_batch=a, device="cpu")
    quantus_metric(name, None)(model=reference, x_batch=x, y_batch=y, a_batch=a, device="cpu")
    assert len(ours_calls.inputs) == len(reference_calls.inputs) > 2
    for mine, theirs, output in zip(ours_calls.inputs, reference_calls.inputs, ours_calls.outputs):
        removed = (theirs == 7.5).all(1)  # the pixels Quantus meant to remove, from its own fill
        assert torch.equal(torch.isnan(mine).all(1), removed)
        assert torch.allclose(output, direct(masked, torch.from_numpy(x), ~removed), atol=1e-5)
    assert np.isfinite(np.asarray(scores, dtype=float)).all()


def test_quantus_steps_that_split_a_pixels_channels_are_refused(pixels):
    quantus = pytest.importorskip("quantus")
    from captum_layermask.interop.quantus import LayerMaskRemoval

    metric = quantus.PixelFlipping(features_in_step=4, perturb_func=LayerMaskRemoval(), disable_warnings=True)
    a = np.random.default_rng(1).random((2, 1, 12, 12)).astype(np.float32)
    with pytest.raises(ChannelSplitError, match="features_in_step"):
        metric(
            model=NaNMasked(layer_masked(small_cnn())),
            x_batch=normalize(pixels).numpy(),
            y_batch=np.array([0, 1]),
            a_batch=a,
        )


def test_quantus_irof_and_road(pixels):
    quantus = pytest.importorskip("quantus")
    from captum_layermask.interop.quantus import LayerMaskRemoval

    masked = layer_masked(small_cnn())
    model, x, y = NaNMasked(masked), normalize(pixels).numpy(), np.array([0, 1])
    a = np.random.default_rng(1).random((2, 1, 12, 12)).astype(np.float32)
    segments = (np.arange(144).reshape(1, 1, 12, 12) // 36) == np.array([1, 2]).reshape(2, 1, 1, 1)
    removed = LayerMaskRemoval()(arr=x, mask=segments)  # how IROF calls it: a (B, 1, H, W) mask
    assert np.array_equal(np.isnan(removed), np.broadcast_to(segments, x.shape))
    if hasattr(np, "trapz"):  # Quantus 0.6's IROF computes its AUC with np.trapz, which NumPy 2.4 removed
        calls = ModelCalls(model)
        irof = quantus.IROF(segmentation_method="slic", perturb_func=LayerMaskRemoval(), disable_warnings=True)
        assert np.isfinite(irof(model=model, x_batch=x, y_batch=y, a_batch=a)).all()
        for inputs, output in zip(calls.inputs, calls.outputs):
            assert torch.allclose(output, direct(masked, torch.from_numpy(x), ~torch.isnan(inputs).all(1)), atol=1e-5)
    with pytest.raises(LayerMaskError, match="multi-channel"):  # Quantus 0.6's ROAD cannot rank RGB pixels
        quantus.ROAD(percentages=[20], perturb_func=LayerMaskRemoval(), disable_warnings=True)(
            model=model, x_batch=x, y_batch=y, a_batch=a
        )
    # ROAD on single-channel images: each call removes exactly the pixels ROAD ranked first
    grey = layer_masked(small_cnn(channels=1))
    removals = []

    class RecordingRemoval(LayerMaskRemoval):
        def __call__(self, arr, indices=None, **kwargs):
            removals.append(np.asarray(indices).copy())
            return super().__call__(arr, indices, **kwargs)

    model = NaNMasked(grey)
    calls = ModelCalls(model)
    x1 = x[:, :1]
    road = quantus.ROAD(percentages=[10, 50, 90], perturb_func=RecordingRemoval(), disable_warnings=True)
    scores = road(model=model, x_batch=x1, y_batch=y, a_batch=a)
    assert list(scores) == [10, 50, 90] and len(calls.inputs) == 3
    order = np.argsort(-a.reshape(2, -1), axis=1)
    for step, (inputs, output) in enumerate(zip(calls.inputs, calls.outputs)):
        keep = np.ones((2, 144), bool)
        for image in range(2):
            assert np.array_equal(removals[2 * step + image], order[image, : int(144 * (10, 50, 90)[step] / 100)])
            keep[image, removals[2 * step + image]] = False
        keep = torch.from_numpy(keep.reshape(2, 12, 12))
        assert torch.equal(~torch.isnan(inputs).all(1), keep)
        assert torch.allclose(output, direct(grey, torch.from_numpy(x1), keep), atol=1e-5)


def test_a_plain_model_given_removed_pixels_is_refused(pixels):
    quantus = pytest.importorskip("quantus")
    from captum_layermask.interop.quantus import LayerMaskRemoval
    from captum_layermask.interop.road import LayerMaskImputer

    metric = quantus.RegionPerturbation(
        patch_size=4, regions_evaluation=2, perturb_func=LayerMaskRemoval(), disable_warnings=True
    )
    a = np.random.default_rng(1).random((2, 1, 12, 12)).astype(np.float32)
    with pytest.raises(LayerMaskError, match="not layer-masked"):
        metric(model=small_cnn(), x_batch=normalize(pixels).numpy(), y_batch=np.array([0, 1]), a_batch=a)
    imputed = LayerMaskImputer()(torch.rand(3, 12, 12), torch.rand(12, 12) > 0.5)
    with pytest.raises(LayerMaskError, match="not layer-masked"):
        small_cnn()(imputed[None])


# --- ROAD's imputer interface ----------------------------------------------------------------------------------


def test_the_road_imputer_removes_exactly_the_absent_pixels():
    from captum_layermask.interop.road import LayerMaskImputer

    generator = torch.Generator().manual_seed(0)
    images, present = torch.rand(2, 3, 12, 12, generator=generator), torch.rand(2, 12, 12, generator=generator) > 0.4
    imputer = LayerMaskImputer()
    batched = imputer.batched_call(images, present.float())
    assert torch.allclose(batched[1], imputer(images[1], present[1].float()), equal_nan=True)
    assert torch.equal(torch.isnan(batched), ~present[:, None].expand(-1, 3, -1, -1))
    assert torch.equal(batched[present[:, None].expand(-1, 3, -1, -1)], images[present[:, None].expand(-1, 3, -1, -1)])
    masked = layer_masked(small_cnn())
    normalized = (batched - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )  # ROAD's transform
    with torch.no_grad():
        expected = direct(
            masked, (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), present
        )
        assert torch.allclose(NaNMasked(masked)(normalized), expected, atol=1e-6)
    with pytest.raises(LayerMaskError, match=r"mask \(H, W\)"):
        imputer(images[0], present)


def test_an_images_own_nan_is_refused_where_the_tool_shows_the_unperturbed_image(pixels):
    from captum_layermask.interop.road import LayerMaskImputer
    from captum_layermask.interop.shap import LayerMaskImage

    image = pixels[0].copy()
    image[3, 4, :] = np.nan  # a real pixel, NaN in every channel: it would read as removed
    with pytest.raises(LayerMaskError, match="holds NaN values"):
        LayerMaskImage(image.shape)(np.ones(144, dtype=bool), image)
    with pytest.raises(LayerMaskError, match="holds NaN values"):
        LayerMaskImputer()(torch.from_numpy(image).permute(2, 0, 1), torch.ones(12, 12))


def test_uint8_images_need_a_scale(pixels):
    model = ArrayModel(layer_masked(small_cnn()), mean=MEAN, std=STD)
    eight_bit = (pixels * 255).round().astype(np.uint8)
    with pytest.raises(ValueError, match="pass scale=255"):
        model(eight_bit)
    scaled = ArrayModel(layer_masked(small_cnn()), mean=MEAN, std=STD, scale=255)
    assert np.allclose(scaled(eight_bit), model(eight_bit.astype(np.float32) / 255), atol=1e-6)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_nan_guard_survives_an_exception_in_a_forward(pixels, error):
    """The same guard as LayerMask()'s (captum_layermask.core.guard): an interrupted call leaves no state that
    would skip the check of a later plain model."""
    from captum_layermask.interop.road import LayerMaskImputer

    imputer, calls = LayerMaskImputer(), []
    interrupted = small_cnn()

    def hook(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise error

    interrupted[4].register_forward_pre_hook(hook)
    x = imputer(torch.rand(3, 12, 12), torch.rand(12, 12) > 0.5)[None]
    model = NaNMasked(layer_masked(interrupted))
    model(x)
    with pytest.raises(error):
        model(x)
    for plain in (small_cnn(), interrupted, interrupted[0]):  # another model, the same one, a part of it
        with pytest.raises(LayerMaskError, match="not layer-masked"):
            plain(x)


def test_a_wrapper_that_changes_nan_pixels_before_nanmasked_is_refused(pixels):
    from captum_layermask.interop.road import LayerMaskImputer

    imputer = LayerMaskImputer()
    x = imputer(torch.rand(3, 12, 12), torch.rand(12, 12) > 0.5)[None]
    inner = NaNMasked(layer_masked(small_cnn()))

    class FillsFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.nan_to_num(x))

    with pytest.raises(LayerMaskError, match="wrapper changed those pixels first"):
        FillsFirst()(x)
    assert torch.equal(nn.Sequential(inner)(x), inner(x))  # a wrapper that passes them on is fine
