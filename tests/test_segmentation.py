"""Dense outputs: the output mask (``return_mask=True``) of torchvision's segmentation models, of classifiers and
of a chain of layers where it can be computed by hand, and its ONNX export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion
from torch import nn

from captum_layermask import LayerMask, LayerMaskError, MaskShapeError, RegionScores, layer_masked
from captum_layermask.evaluation import get_masker, region_attribution_mass, removal_order, segmentation_removal_curve
from captum_layermask.evaluation.dense import confusion, mean_iou
from captum_layermask.integrations.captum import mask_from_baseline
from tests.helpers import patch_masks, patches, randomize_batchnorm, small_classifier, visible_any

SEGMENTATION_MODELS = {
    "fcn_resnet50": 128,
    "deeplabv3_resnet50": 128,
    "deeplabv3_mobilenet_v3_large": 192,  # output stride 16: at 128 pixels every output cell sees the left quarter
    "lraspp_mobilenet_v3_large": 128,
}


def segmentation_model(name):
    """A torchvision segmentation model with random weights and batch-norm statistics (with its auxiliary head
    where it has one: two outputs)."""
    torch.manual_seed(0)
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    build = getattr(torchvision.models.segmentation, name)
    return randomize_batchnorm(build(weights=None, weights_backbone=None, num_classes=4, **aux).eval())


def test_the_output_mask_of_a_chain_of_layers_is_the_window_rule_applied_layer_by_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Upsample(scale_factor=2, mode="nearest"),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.ones(2, 1, 32, 32)
    mask[0, :, :, 8:] = 0
    mask[1, :, 10:20, 4:30] = 0
    with torch.no_grad():
        out, out_mask = layer_masked(model)(x, mask, return_mask=True)
    expected = visible_any(visible_any(mask, (3, 3), (1, 1), (1, 1), (1, 1)), (3, 3), (2, 2), (1, 1), (1, 1))
    expected = F.interpolate(expected.float(), scale_factor=2, mode="nearest") > 0
    assert out_mask.dtype == torch.bool and out_mask.shape == (2, 1, 32, 32)
    assert torch.equal(out_mask, expected)
    assert torch.all(out.masked_select(~out_mask.expand_as(out)) == 0)


@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_segmentation_models_return_an_output_mask_per_output(name):
    size = SEGMENTATION_MODELS[name]
    model = segmentation_model(name)
    masked = layer_masked(model)
    x = torch.randn(2, 3, size, size)
    mask = torch.ones(2, 1, size, size)
    mask[:, :, :, size // 4 :] = 0  # three quarters removed
    mask[1, :, : size // 2] = 1
    with torch.no_grad():
        plain = model(x)
        full, full_masks = masked(x, torch.ones_like(mask), return_mask=True)
        out, out_masks = masked(x, mask, return_mask=True)
        noisy, noisy_masks = masked(torch.where(mask > 0, x, torch.nan), mask, return_mask=True)
    assert set(out) == set(out_masks) == set(plain)
    for key in plain:
        assert torch.allclose(full[key], plain[key], rtol=1e-4, atol=1e-4 * float(plain[key].abs().max()))
        assert bool(full_masks[key].all())
        assert out_masks[key].shape == (2, 1, size, size) and out_masks[key].dtype == torch.bool
        # nothing in removed pixels changes any output cell, and the cells far inside the removed region
        # (the right column of the first image) are marked removed and are 0
        assert torch.equal(noisy[key], out[key]) and torch.equal(noisy_masks[key], out_masks[key])
        assert not bool(out_masks[key][0, 0, :, -1].any())
        assert bool(out_masks[key][0, 0, :, : size // 4].all())
        assert torch.all(out[key][0, :, :, -1] == 0)


def test_a_classifier_s_output_mask_says_whether_any_visible_pixel_reached_it():
    model = small_classifier().eval()
    masked = layer_masked(model)
    x = torch.randn(3, 3, 32, 32)
    mask = patch_masks(3, 32, 32, 8)
    mask[2] = 0
    with torch.no_grad():
        logits, visible = masked(x, mask, return_mask=True)
        _, unmasked = masked(x, return_mask=True)
    assert visible.shape == (3, 1) and visible.tolist() == [[True], [True], [False]]
    assert torch.all(logits[2] == 0)
    assert unmasked.shape == (1, 1) and bool(unmasked.all())


def test_the_output_mask_exports_to_onnx_as_a_second_output(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx_export import export_masked

    model = segmentation_model("lraspp_mobilenet_v3_large")
    masked = layer_masked(model, output="out")
    path = export_masked(masked, tmp_path / "segmentation.onnx", input_shape=(2, 3, 64, 64), return_mask=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["logits", "output_mask"]
    x = torch.randn(3, 3, 64, 64)
    mask = patch_masks(3, 64, 64, 16, keep=0.3, seed=4).float()
    logits, out_mask = session.run(None, {"image": x.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected, expected_mask = masked(x, mask, return_mask=True)
    assert np.array_equal(out_mask, expected_mask.numpy())
    assert np.abs(logits - expected.numpy()).max() <= 1e-4 * float(expected.abs().max())


# ---------------------------------------------------------------------------------------------------------------
# RegionScores: a region of a segmentation explained through Captum


def small_segmenter():
    """An FCN in miniature: two 3x3 convolutions (one strided), a 1x1 classifier, bilinear upsampling."""
    torch.manual_seed(0)

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
            )
            self.classifier = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            logits = self.classifier(self.features(x))
            return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    return Segmenter().eval()


def region_mean(logits, visible, region):
    """The score by hand: per class, the mean logit over the region's visible output pixels (0 if none)."""
    cells = (region & visible)[0, 0]
    if not cells.any():
        return torch.zeros(logits.shape[:2])
    return logits[:, :, cells].mean(dim=2)


def square_region(size=16):
    region = torch.zeros(size, size, dtype=torch.bool)
    region[4:12, 8:14] = True
    return region


class Recorder(nn.Module):
    """Forwards to RegionScores and checks every sample against the score computed by hand from a direct call."""

    def __init__(self, scores, masked, image, region):
        super().__init__()
        self.scores, self.masked, self.image, self.region = scores, masked, image, region
        self.samples = 0

    def forward(self, x):
        out = self.scores(x)
        for i in range(len(x)):
            keep = mask_from_baseline(x[i : i + 1])
            keep = torch.ones(1, 1, 16, 16, dtype=torch.bool) if keep is None else keep
            with torch.no_grad():
                logits, visible = self.masked(self.image, keep, return_mask=True)
            expected = region_mean(logits["out"], visible["out"], self.region)
            assert torch.allclose(out[i], expected[0], atol=1e-6)
            self.samples += 1
        return out


@pytest.mark.parametrize("method", [Lime, KernelShap, FeatureAblation, Occlusion])
def test_region_scores_are_the_region_mean_of_a_direct_masked_call_in_every_evaluation(method):
    masked = layer_masked(small_segmenter())
    image, region = torch.randn(1, 3, 16, 16), square_region()
    recorder = Recorder(RegionScores(masked, region, output="out"), masked, image, region[None, None])
    if method is Occlusion:
        options = {"sliding_window_shapes": (3, 4, 4), "strides": (3, 4, 4)}
    else:
        options = {"feature_mask": patches(), **({"n_samples": 30} if method in (Lime, KernelShap) else {})}
    attr = method(recorder).attribute(image, target=1, baselines=LayerMask(), perturbations_per_eval=4, **options)
    assert recorder.samples >= 16 and attr.shape == image.shape and attr.isfinite().all()


@pytest.mark.parametrize("layer_mask", [True, False])
def test_feature_ablation_of_a_region_is_the_hand_computed_drop(layer_mask):
    model = small_segmenter()
    masked = layer_masked(model)
    image, region, segments = torch.randn(1, 3, 16, 16), square_region(), patches()
    scores = RegionScores(masked if layer_mask else model, region, output="out")
    attr = FeatureAblation(scores).attribute(
        image, target=2, feature_mask=segments, baselines=LayerMask() if layer_mask else 0.0, perturbations_per_eval=3
    )
    with torch.no_grad():
        for feature in range(16):
            keep = (segments != feature)[0, 0]
            if layer_mask:
                logits, visible = masked(image, keep, return_mask=True)
                after = region_mean(logits["out"], visible["out"], region[None, None])
            else:  # a grey (zero) fill: every region pixel counts
                after = model(image * keep)["out"][:, :, region].mean(dim=2)
            before = model(image)["out"][:, :, region].mean(dim=2)
            got = attr[0, :, segments[0, 0] == feature]
            assert torch.allclose(got, (before - after)[0, 2].expand_as(got), atol=1e-5)


def test_a_region_that_no_visible_pixel_reaches_scores_zero():
    model = segmentation_model("fcn_resnet50")
    image = torch.randn(2, 3, 64, 64)
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[:, 56:] = True
    scores = RegionScores(layer_masked(model), region, output="out")
    mask = torch.ones(2, 1, 64, 64)
    mask[0, :, :, 8:] = 0  # the region is far inside the removed part of the first image
    with torch.no_grad():
        out = scores(image, mask=mask)
        plain = RegionScores(model, region, output="out")(image)
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.allclose(out[1], plain[1], atol=1e-4 * float(plain.abs().max()))


def test_region_scores_refuse_what_they_cannot_score():
    masked = layer_masked(small_segmenter())
    with pytest.raises(MaskShapeError, match="region must be"):
        RegionScores(masked, torch.ones(3, 16, 16), output="out")
    with pytest.raises(LayerMaskError, match="output="):
        RegionScores(masked, square_region())(torch.randn(1, 3, 16, 16))
    with pytest.raises(MaskShapeError, match="output pixels"):
        RegionScores(masked, torch.ones(8, 8), output="out")(torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------------------
# missingness bias per pixel


def test_mean_iou_is_the_mean_over_present_classes_of_intersection_over_union():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 3]])
    counted = torch.ones_like(truth, dtype=torch.bool)
    counted[1, 3] = False  # class 3 is predicted on an uncounted pixel only: it does not count
    counts = confusion(predicted, truth, counted, 4)
    # class 0: 1 of {(0,0), (0,1), (1,2)} -> 1/3; class 1: 2 of 3 -> 2/3; class 2: 2 of 3 -> 2/3
    assert mean_iou(counts) == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


@pytest.mark.parametrize("masker", ["layer", "grey"])
def test_the_removal_curve_scores_the_visible_pixels_of_each_masked_prediction(masker):
    model = small_segmenter()
    images = torch.randn(3, 3, 16, 16)
    labels = torch.randint(0, 3, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    curve = segmentation_removal_curve(
        model,
        images,
        labels,
        patches(16, 4)[0].expand(3, 16, 16),
        "random",
        masker,
        (0.0, 0.5),
        output="out",
        show_progress=False,
    )
    segments = patches(16, 4)[0].expand(3, 16, 16)
    orders = removal_order(segments, "random", seed=0)
    forward = get_masker(masker).bind(model)
    for fraction, got in zip((0.0, 0.5), curve.mean_iou):
        kept = torch.stack([~torch.isin(segments[i], orders[i][: round(fraction * 16)]) for i in range(3)])
        with torch.no_grad():
            predicted = forward(images, kept[:, None])["out"].argmax(1)
        correct = {c: int(((predicted == c) & (labels == c) & kept).sum()) for c in range(3)}
        union = {c: int((((predicted == c) | (labels == c)) & kept).sum()) for c in range(3)}
        assert got == pytest.approx(sum(correct[c] / union[c] for c in range(3) if union[c]) / 3)
    assert curve.rows()[0]["value"] == pytest.approx(0.5 * sum(curve.mean_iou) / 2)


def test_a_pointwise_segmentation_explained_with_layer_masking_puts_all_its_mass_on_the_region():
    torch.manual_seed(0)

    class Pointwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.conv(x)

    images = torch.randn(4, 3, 16, 16)
    regions = torch.zeros(4, 16, 16, dtype=torch.bool)
    regions[:, 4:12, 4:8] = True
    mass = region_attribution_mass(
        Pointwise().eval(), images, regions, [0, 1, 0, 1], "layer", segmenter=patches(16, 4)[0].expand(4, 16, 16)
    )
    shares = mass.on_region[~mass.on_region.isnan()]
    assert len(shares) >= 2 and torch.allclose(shares, torch.ones_like(shares))


def test_the_demo_segmentation_model_segments_held_out_scenes_and_converts():
    from captum_layermask.demo import shapes
    from captum_layermask.demo.model import load_demo_segmenter
    from captum_layermask.demo.train import mean_iou as demo_mean_iou

    model = load_demo_segmenter()
    scenes = shapes.segmentation_scenes(200, torch.Generator().manual_seed(7))
    assert demo_mean_iou(model, scenes) >= 0.9
    x = shapes.normalize(scenes.images[:4])
    mask = patch_masks(4, 128, 128, 16, keep=0.5, seed=3)
    masked = layer_masked(model)
    with torch.no_grad():
        assert torch.allclose(masked(x, torch.ones_like(mask)), model(x), atol=1e-4)
        out, out_mask = masked(x, mask, return_mask=True)
        assert torch.equal(masked(torch.where(mask, x, torch.nan), mask), out)
    assert out_mask.shape == (4, 1, 128, 128) and bool(out_mask[mask].all())


def test_a_segmentation_dataset_run_gives_the_in_memory_evaluation_and_resumes(tmp_path):
    from captum_layermask.datasets import evaluate_dataset
    from captum_layermask.demo import shapes
    from captum_layermask.demo.model import load_demo_segmenter
    from captum_layermask.evaluation.dense_report import evaluate_segmentation

    model = load_demo_segmenter()
    scenes = shapes.segmentation_scenes(4, torch.Generator().manual_seed(5))
    labels = shapes.pixel_labels(scenes)
    dataset = torch.utils.data.TensorDataset(scenes.images, labels)
    options = dict(size=128, mean=shapes.MEAN, std=shapes.STD, lime_images=2, batch_size=16, show_progress=False)
    run = evaluate_dataset(model, dataset, tmp_path / "run", task="segmentation", **options)
    report = run.report()
    # the in-memory evaluation with the same regions: each image's most frequent object class
    counts = torch.stack([torch.bincount(label.flatten(), minlength=7) for label in labels])
    counts[:, 0] = 0
    targets = counts.argmax(1)
    regions = labels == targets[:, None, None]
    expected = evaluate_segmentation(
        model, shapes.normalize(scenes.images), labels, regions, targets.tolist(), mean=shapes.MEAN,
        std=shapes.STD, explained=2, show_progress=False,
    )  # fmt: skip
    by_key = {(c.order, c.masker): c for c in expected.curves}
    for curve in report.curves:  # background first is deterministic; random orders are seeded per image
        reference = by_key[(curve.order, curve.masker)]
        compared = curve.mean_iou if curve.order == "least_salient" else curve.mean_iou[:1]
        assert compared == pytest.approx(reference.mean_iou[: len(compared)], abs=1e-9)
    references = {mass.masker: mass for mass in expected.masses}
    for mass in report.masses:
        assert mass.mean == pytest.approx(references[mass.masker].mean, abs=1e-6)
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npz")}
    again = evaluate_dataset(model, dataset, tmp_path / "run", task="segmentation", **options)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npz")} == written
    assert again.report().markdown() == report.markdown()


def test_a_folder_of_images_with_label_maps_gives_the_dataset_s_evaluation(tmp_path):
    from PIL import Image

    from captum_layermask.cli import main
    from captum_layermask.datasets import evaluate_dataset
    from captum_layermask.demo import shapes
    from captum_layermask.demo.model import load_demo_segmenter

    scenes = shapes.segmentation_scenes(3, torch.Generator().manual_seed(9))
    images = (scenes.images * 255).round() / 255  # what 8-bit PNG files hold
    labels = shapes.pixel_labels(scenes)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for index in range(3):
        pixels = (images[index].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{index}.png")
        label_map = labels[index].numpy().astype(np.uint8)
        label_map[0, :] = 255  # Pascal VOC's "not scored" on object boundaries
        Image.fromarray(label_map, mode="L").convert("P").save(tmp_path / "labels" / f"{index}.png")
    labels[:, 0, :] = 255
    options = dict(size=128, mean=shapes.MEAN, std=shapes.STD, lime_images=1, batch_size=16, show_progress=False)
    model = load_demo_segmenter()
    from_folder = evaluate_dataset(
        model, tmp_path / "images", tmp_path / "a", task="segmentation", label_maps=tmp_path / "labels", **options
    ).report()
    dataset = torch.utils.data.TensorDataset(images, labels)
    from_dataset = evaluate_dataset(model, dataset, tmp_path / "b", task="segmentation", **options).report()
    assert from_folder.markdown() == from_dataset.markdown()
    args = ["evaluate", "--task", "segmentation", "--images", str(tmp_path / "images"), "--lime-images", "0"]
    assert main(args + ["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "cli")]) == 0
    assert main(args + ["--out", str(tmp_path / "no-labels")]) == 2


def test_labels_outside_the_classes_are_not_scored():
    truth = torch.tensor([[0, 1, 255]])
    counted = torch.ones_like(truth, dtype=torch.bool)
    assert confusion(torch.tensor([[0, 1, 1]]), truth, counted, 2).sum() == 2


def test_a_region_is_never_explained_for_a_label_the_model_does_not_have(tmp_path):
    from captum_layermask.datasets import evaluate_dataset
    from captum_layermask.demo import shapes
    from captum_layermask.demo.model import load_demo_segmenter

    scenes = shapes.render(1, torch.Generator().manual_seed(3))
    labels = shapes.pixel_labels(scenes)
    labels[:, :60] = 255  # a "not scored" band larger than the object
    labels[:, :, :60] = 255
    assert int((labels == 255).sum()) > int((labels == int(scenes.labels[0, 0]) + 1).sum()) > 0
    dataset = torch.utils.data.TensorDataset(scenes.images, labels)
    run = evaluate_dataset(
        load_demo_segmenter(), dataset, tmp_path / "run", task="segmentation", maskers=["layer"], size=128,
        mean=shapes.MEAN, std=shapes.STD, lime_images=1, show_progress=False,
    )  # fmt: skip
    assert int(run.records()[0]["target"]) == int(scenes.labels[0, 0]) + 1
