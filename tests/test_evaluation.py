"""Removal curves, shape bias and the LIME metrics (paper section 4), and `layermask evaluate`."""

import csv
import math

import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import MaskShapeError, layer_masked
from captum_layermask.cli import main
from captum_layermask.evaluation import (
    alignment_score,
    broken_mask,
    class_entropy,
    lime_attributions,
    lime_metrics,
    removal_curve,
    removal_order,
    segment_scores,
    shape_bias,
    topk_ablation_accuracy,
    topk_jaccard,
)
from captum_layermask.evaluation.diagnostics import magnitude_curve
from captum_layermask.evaluation.plots import plot_lime_metrics, plot_removal_curves, plot_shape_bias, plot_size_curves
from captum_layermask.evaluation.report import EvaluationData, evaluate
from captum_layermask.evaluation.segmentation import segment_images

from .helpers import small_classifier as small_cnn


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=generator)
    objects = torch.zeros(6, 32, 32, dtype=torch.bool)
    for index in range(6):
        top, left = torch.randint(0, 16, (2,), generator=generator).tolist()
        objects[index, top : top + 12, left : left + 10] = True
    return images, objects


def labels_of(model, images):
    with torch.no_grad():
        return model(images).argmax(1)


# --- removal curves --------------------------------------------------------------------------------------------


def test_removal_curve_starts_at_clean_accuracy_and_ends_with_nothing_visible(data):
    model, (images, _) = small_cnn(), data
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    clean = float((labels_of(model, images) == labels).double().mean())
    for masker in ("layer", "grey", "black"):
        curve = removal_curve(
            model, images, labels, "patches", "random", masker, [0.0, 0.5, 1.0], batch_size=4, show_progress=False
        )
        assert curve.accuracy[0] == pytest.approx(clean) and curve.unchanged[0] == 1.0
        assert curve.predictions.shape == (6, 3)
    layer = removal_curve(model, images, labels, Patches8(), "random", "layer", [0.0, 1.0], show_progress=False)
    assert torch.equal(layer.predictions[:, 1], torch.zeros(6, dtype=torch.long))  # all-zero logits: class 0
    assert layer.entropy[1] == 0.0


class Patches8:
    name = "patches8"

    def __call__(self, image):
        from captum_layermask.evaluation.segmentation import Patches

        return Patches(8)(image)


def test_removal_curve_predictions_are_those_of_the_masked_images(data):
    model, (images, _) = small_cnn(), data
    labels = labels_of(model, images)
    curve = removal_curve(
        model, images, labels, Patches8(), "random", "layer", [0.25, 0.5], seed=3, show_progress=False
    )
    segments = segment_images(images, Patches8())
    orders = removal_order(segments, "random", seed=3)
    masked = layer_masked(model)
    for index in (0, 5):
        removed = orders[index][:8]  # half of 16 patches
        keep = ~torch.isin(segments[index], removed)
        assert int(keep.sum()) == 32 * 32 // 2
        with torch.no_grad():
            assert curve.predictions[index, 1] == masked(images[index : index + 1], keep).argmax(1)[0]
    assert curve.segmenter == "patches8" and curve.masker == "layer"


def test_salient_orders_rank_segments_by_summed_saliency():
    segments = torch.arange(4).repeat_interleave(4).view(1, 4, 4)  # row i is segment i
    saliency = torch.zeros(1, 4, 4)
    saliency[0, 2] = 1.0
    saliency[0, 0, 0] = 0.5
    assert removal_order(segments, "most_salient", saliency)[0].tolist() == [2, 0, 1, 3]
    assert removal_order(segments, "least_salient", saliency)[0].tolist() == [1, 3, 0, 2]
    assert torch.equal(removal_order(segments, "random", seed=1)[0], removal_order(segments, "random", seed=1)[0])
    with pytest.raises(MaskShapeError, match="needs saliency maps"):
        removal_order(segments, "most_salient")
    with pytest.raises(ValueError, match="order must be one of"):
        removal_order(segments, "salient")


def test_auc_class_entropy_and_input_checks(data):
    assert class_entropy(torch.arange(8), 8) == pytest.approx(math.log(8))
    assert class_entropy(torch.zeros(5, dtype=torch.long), 3) == 0.0
    model, (images, _) = small_cnn(), data
    curve = removal_curve(
        model, images, labels_of(model, images), "patches", "random", "grey", [0.0, 1.0], show_progress=False
    )
    assert curve.auc["unchanged"] == pytest.approx((1.0 + curve.unchanged[1]) / 2)
    with pytest.raises(MaskShapeError, match="labels must have shape"):
        removal_curve(model, images, torch.zeros(3, dtype=torch.long), show_progress=False)
    with pytest.raises(ValueError, match="fractions must increase within"):
        removal_curve(model, images, labels_of(model, images), fractions=[1.5], show_progress=False)


# --- shape bias ------------------------------------------------------------------------------------------------


def test_broken_mask_moves_each_quadrant_to_the_opposite_corner_and_keeps_the_area(data):
    _, objects = data
    broken = broken_mask(objects)
    assert torch.equal(broken.sum((1, 2)), objects.sum((1, 2)))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1, 2] = mask[6, 5] = True  # one pixel in the top-left and one in the bottom-right quadrant
    assert broken_mask(mask).nonzero().tolist() == [[2, 1], [5, 6]]


def test_shape_bias_counts_correct_images_and_compares_the_two_removals(data):
    model, (images, objects) = small_cnn(), data
    labels = labels_of(model, images)
    labels[0] = (labels[0] + 1) % 5  # one image is misclassified: left out
    result = shape_bias(model, images, labels, objects, "layer", show_progress=False)
    assert result.count == 5
    masked = layer_masked(model)
    with torch.no_grad():
        hit = masked(images[1:], ~objects[1:]).argmax(1) == labels[1:]
        broken_hit = masked(images[1:], ~broken_mask(objects[1:])).argmax(1) == labels[1:]
    assert result.object_accuracy == pytest.approx(float(hit.double().mean()))
    assert result.difference == pytest.approx(float(broken_hit.double().mean() - hit.double().mean()))
    assert sum(count for _, _, count in result.per_class.values()) == 5
    with pytest.raises(MaskShapeError, match="object masks must have shape"):
        shape_bias(model, images, labels, objects[:, :16], show_progress=False)


# --- LIME metrics ----------------------------------------------------------------------------------------------


def test_alignment_score_is_one_for_the_ground_truth_and_minus_one_for_its_negation(data):
    images, objects = data
    segments = segment_images(images, Patches8())
    truth = []
    for ids, mask in zip(segments, objects.double()):
        g = torch.zeros(16, dtype=torch.float64).index_add_(0, ids.flatten(), (mask - mask.mean()).flatten())
        truth.append(g[ids])
    truth = torch.stack(truth)
    assert torch.allclose(alignment_score(truth, segments, objects), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(alignment_score(-truth, segments, objects), -torch.ones(6, dtype=torch.float64))
    assert torch.allclose(
        alignment_score(truth[:, None].expand(-1, 3, -1, -1), segments, objects), torch.ones(6, dtype=torch.float64)
    )


def test_topk_jaccard_of_a_perfect_ranking_is_one():
    segments = segment_images(torch.zeros(1, 3, 32, 32), Patches8())
    objects = torch.isin(segments, torch.tensor([1, 5, 6]))
    ranking = objects.double() + 0.01 * torch.rand(1, 32, 32).round()  # the object's segments first
    assert topk_jaccard(ranking, segments, objects, k=3).tolist() == [1.0]
    assert topk_jaccard(ranking, segments, objects, k=6).item() == pytest.approx(0.5)
    assert topk_jaccard(-objects.double(), segments, objects, k=3).item() == 0.0


def test_segment_scores_are_segment_means(data):
    images, _ = data
    segments = segment_images(images[:1], Patches8())
    attributions = torch.randn(1, 32, 32)
    scores = segment_scores(attributions, segments)[0]
    assert scores[5].item() == pytest.approx(attributions[0][segments[0] == 5].mean().item())


def test_topk_ablation_accuracy_removes_the_top_segments(data):
    model, (images, _) = small_cnn(), data
    labels = labels_of(model, images)
    segments = segment_images(images, Patches8())
    attributions = torch.stack([(ids == 3).double() * 2 + (ids == 9).double() for ids in segments])
    accuracy = topk_ablation_accuracy(
        model, images, labels, attributions, segments, k=2, masker="grey", show_progress=False
    )
    with torch.no_grad():
        expected = model(images * ~torch.isin(segments, torch.tensor([3, 9]))[:, None]).argmax(1) == labels
    assert accuracy == pytest.approx(float(expected.double().mean()))


def test_lime_gives_every_masker_the_same_samples_and_one_value_per_segment(data):
    model, (images, _) = small_cnn(), data
    segments = segment_images(images[:2], Patches8())
    seen = {}

    def recording(name):
        def masker(model_, x, mask):
            seen.setdefault(name, []).append(mask.clone())
            return model_(x * mask)

        return masker

    maps = [
        lime_attributions(
            model,
            images[:2],
            torch.tensor([1, 2]),
            segments,
            recording(name),
            n_samples=40,
            perturbations_per_eval=8,
            show_progress=False,
        )
        for name in "ab"
    ]
    assert all(torch.equal(a, b) for a, b in zip(seen["a"], seen["b"]))
    assert torch.equal(maps[0], maps[1])
    for mask in seen["a"]:  # unions of whole segments
        for ids, m in zip(segments[:1].expand(len(mask), -1, -1), mask[:, 0]):
            assert all(m[ids == s].all() or not m[ids == s].any() for s in range(16))
    ids = segments[0]
    assert all(maps[0][0][ids == s].unique().numel() == 1 for s in range(16))


def test_lime_metrics_on_a_tiny_model(data):
    model, (images, objects) = small_cnn(), data
    results = lime_metrics(
        model,
        images[:2],
        torch.tensor([1, 2]),
        objects[:2],
        Patches8(),
        ["grey", "layer"],
        k=3,
        n_samples=24,
        show_progress=False,
    )
    assert list(results) == ["grey", "layer"]
    for result in results.values():
        assert (
            0 <= result.topk_ablation_accuracy <= 1
            and -1 <= result.alignment_score <= 1
            and 0 <= result.topk_jaccard <= 1
        )
        assert result.attributions.shape == (2, 32, 32)


# --- report, figures and the command -------------------------------------------------------------------------


def test_report_tables_csv_and_figures(data, tmp_path):
    model, (images, objects) = small_cnn(), data
    report = evaluate(
        model,
        EvaluationData(images, labels_of(model, images), objects),
        maskers=["grey", "layer"],
        fractions=[0, 0.5, 1],
        lime_images=2,
        n_samples=16,
        k=2,
        show_progress=False,
    )
    assert len(report.removal) == 3 * 2 and len(report.shape) == 2 and set(report.lime["patches"]) == {"grey", "layer"}
    markdown = report.to_markdown()
    assert "| accuracy: layer masking |" in markdown and "alignment score: grey fill" in markdown
    report.to_csv(tmp_path / "results.csv")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert (
        len(rows) == len(report.rows()) == 6 * 3 + 2 * 3 + 2 * 3 + 2 * 3 + 2 * 2 * 5
    )  # + linearity, collapse, magnitude
    assert list(report.linearity["layer"]) == [16, 8, 4] and report.collapse[1].sizes == [4, 8, 16, 24, 32]
    assert "**Linearity in masking** (6 images)" in markdown and "**Output collapse**" in markdown
    names = {p.name for p in report.save_figures(tmp_path)}
    assert names == {
        "removal_patches_random.png",
        "removal_patches_most_salient.png",
        "removal_patches_least_salient.png",
        "shape_bias.png",
        "lime_patches.png",
        "output_collapse.png",
        "feature_magnitude.png",
    }
    figure = plot_size_curves(
        [magnitude_curve(model, images, [8, 32], m, show_progress=False) for m in ("grey", "layer")]
    )
    assert len(figure.axes[0].lines) == 2
    assert (
        plot_removal_curves(report.removal[:2])
        and plot_shape_bias(report.shape)
        and plot_lime_metrics(report.lime["patches"])
    )


def test_evaluate_the_demo_model_offline(tmp_path):
    out = tmp_path / "out"
    args = [
        "evaluate",
        "--limit",
        "6",
        "--lime-images",
        "2",
        "--diagnostic-images",
        "2",
        "--samples",
        "16",
        "--fractions",
        "3",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert {"results.md", "results.csv", "shape_bias.png", "lime_patches.png", "removal_patches_random.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "**Shape bias** (" in (out / "results.md").read_text()


@pytest.fixture
def image_folder(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "masks" / name).mkdir(parents=True)
        for index in range(2):
            torchvision.utils.save_image(torch.rand(3, 40, 48), tmp_path / "images" / name / f"{index}.jpg")
            mask = torch.zeros(1, 40, 48)
            mask[:, 10:30, 12:30] = 1
            torchvision.utils.save_image(mask, tmp_path / "masks" / name / f"{index}.png")
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r18.pth")
    return tmp_path


def test_evaluate_an_image_folder_with_object_masks(image_folder, tmp_path):
    base = [
        "evaluate",
        "--model",
        "resnet18",
        "--weights",
        str(image_folder / "r18.pth"),
        "--num-classes",
        "2",
        "--images",
        str(image_folder / "images"),
        "--size",
        "32",
    ]
    fast = [
        "--lime-images",
        "1",
        "--diagnostic-images",
        "0",
        "--samples",
        "8",
        "--fractions",
        "2",
        "--top-k",
        "1",
        "--maskers",
        "grey,layer",
    ]
    assert main(base + ["--object-masks", str(image_folder / "masks")] + fast + ["--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert {row["section"] for row in rows} == {"removal AUC", "shape bias", "LIME (k=1)"}
    assert main(base + fast + ["--out", str(tmp_path / "plain")]) == 0  # no masks: removal curves only
    assert {row["section"] for row in csv.DictReader(open(tmp_path / "plain" / "results.csv"))} == {"removal AUC"}


def test_evaluate_bad_input_is_one_line_and_leaves_nothing(image_folder, tmp_path, capsys):
    (image_folder / "masks" / "dog" / "1.png").unlink()
    base = [
        "evaluate",
        "--model",
        "resnet18",
        "--weights",
        str(image_folder / "r18.pth"),
        "--num-classes",
        "2",
        "--size",
        "32",
        "--out",
        str(tmp_path / "out"),
    ]
    cases = [
        (["--images", str(image_folder / "images"), "--object-masks", str(image_folder / "masks")], "no object mask"),
        (["--images", str(image_folder / "missing")], "is not a folder"),
        (["--images", str(image_folder / "masks" / "cat")], "holds no images in class subfolders"),
        ([], "--images is needed"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["evaluate", "--maskers", "grey,purple"])


def test_inputs_that_cannot_mean_what_they_say_are_refused_or_normalised():
    attributions = torch.rand(2, 8, 8)
    segments = torch.arange(4).repeat_interleave(16).view(1, 8, 8).expand(2, 8, 8)
    objects = segments < 2
    with pytest.raises(MaskShapeError, match=r"\(N, H, W\)"):
        alignment_score(attributions[0], segments[0], objects[0])  # one (H, W) map is not a batch of rows
    with pytest.raises(MaskShapeError, match=r"\(N, H, W\)"):
        topk_jaccard(attributions[0], segments[0], objects[0], k=1)
    with pytest.raises(MaskShapeError, match="must be integers"):
        topk_jaccard(attributions, segments.float(), objects, k=1)
    for k in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            topk_jaccard(attributions, segments, objects, k=k)
    # ids with gaps or negative ids name the same segments: the same scores
    for relabelled in (segments * 10, segments - 7):
        assert torch.equal(
            topk_jaccard(attributions, relabelled, objects, k=2), topk_jaccard(attributions, segments, objects, k=2)
        )
        assert torch.equal(
            alignment_score(attributions, relabelled, objects), alignment_score(attributions, segments, objects)
        )


def test_removal_fractions_must_increase():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="must increase"):
        removal_curve(model, images, labels, fractions=[1.0, 0.0, 0.5], show_progress=False)
    with pytest.raises(MaskShapeError, match="at least one image"):
        removal_curve(model, images[:0], labels[:0], show_progress=False)
