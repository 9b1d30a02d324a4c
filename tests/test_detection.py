"""Detectors converted by parts: torchvision's six detector families keep the invariants of layer masking, RoI
Align reads visible cells only (against a computation by loops), the detection rule drops boxes over removed
pixels, and ``DetectionScores`` explains one detection through Captum, every call equal to a direct one."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from captum.attr import FeatureAblation, Lime
from torch import nn
from torchvision.models import detection
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import box_iou as torchvision_box_iou

from captum_layermask import (
    DetectionScores,
    LayerMask,
    LayerMaskError,
    MaskShapeError,
    TracingError,
    UnsupportedLayerError,
    layer_masked,
    unregister,
)
from captum_layermask.core.masked import Masked
from captum_layermask.core.parts import LayerMaskedParts, build_parts, register_part_model
from captum_layermask.demo import shapes
from captum_layermask.demo.model import load_demo_detector
from captum_layermask.evaluation.detection import (
    average_precision,
    detect,
    mean_average_precision,
    visible_targets,
    without_ignored,
)
from captum_layermask.integrations.captum import mask_from_baseline
from captum_layermask.integrations.detection import box_iou
from captum_layermask.integrations.torchvision_detection import (
    LayerMaskedDetector,
    background_fill,
    layer_masked_detector,
    multiscale_roi_align,
    roi_align_rule,
    visible_detections,
    visible_share,
)

SMALL = dict(weights=None, weights_backbone=None, min_size=96, max_size=96)
DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": dict(num_classes=5),
    "retinanet_resnet50_fpn": dict(num_classes=5, score_thresh=0.0),
    "fcos_resnet50_fpn": dict(num_classes=5, score_thresh=0.0),
    "ssdlite320_mobilenet_v3_large": dict(num_classes=5, score_thresh=0.0),
    "maskrcnn_resnet50_fpn": dict(num_classes=5, box_detections_per_img=10),
    "keypointrcnn_resnet50_fpn": dict(num_classes=2, num_keypoints=5, box_detections_per_img=10),
}
SLOW_DETECTORS = {
    "fasterrcnn_resnet50_fpn": dict(num_classes=5),
    "fasterrcnn_resnet50_fpn_v2": dict(num_classes=5),
    "retinanet_resnet50_fpn_v2": dict(num_classes=5, score_thresh=0.0),
    "ssd300_vgg16": dict(num_classes=5, score_thresh=0.0),
}


def detector(name, **options):
    """A torchvision detector with random weights (batch norms calibrated on random images), small images, low thresholds so
    that random weights detect something. The heads' weights are scaled to unit gain: at torchvision's
    initialisation (standard deviation 0.01) every box scores about 1 / classes whatever the image."""
    torch.manual_seed(0)
    settings = {**DETECTORS, **SLOW_DETECTORS}[name]
    sizes = {} if name.startswith("ssd") else {"min_size": SMALL["min_size"], "max_size": SMALL["max_size"]}
    build = getattr(detection, name)
    model = build(weights=None, weights_backbone=None, **sizes, **settings, **options)
    for path, module in model.named_modules():  # heads initialised to depend on their input visibly
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not path.startswith("backbone"):
            nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
    return calibrate_batchnorm(model.eval())


def calibrate_batchnorm(model):
    """Batch-norm statistics of random images: at their initial values (or random ones) a MobileNet's features
    no longer depend on the image after a few blocks (measured: 1e-8 apart for two images)."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    images = model.transform([torch.rand(3, 96, 96) for _ in range(4)])[0].tensors
    with torch.no_grad():
        model.backbone.train()(images)
    return model.eval()


def same_detections(first, second, atol=0.0):
    return all(
        first[key].shape == second[key].shape and torch.allclose(first[key].float(), second[key].float(), atol=atol)
        for key in first
    )


def check_invariants(name):
    model = detector(name)
    masked = layer_masked(model)
    assert isinstance(masked, LayerMaskedDetector)
    images = [torch.rand(3, 80, 96), torch.rand(3, 72, 64)]
    full = [torch.ones(80, 96), torch.ones(1, 72, 64)]
    removed = torch.ones(80, 96)
    removed[16:64, 24:80] = 0
    group_norm = any(isinstance(module, nn.GroupNorm) for module in model.modules())
    atol = 1e-4 if group_norm else 0.0  # GroupNorm's statistics of the visible cells round differently
    with torch.no_grad():
        plain = model(images)
        for expected, got in zip(plain, masked(images, full)):
            assert len(expected["boxes"]) > 0 and same_detections(expected, got, atol)
        masked.min_visible = 0.0  # every detection, to compare the whole output
        reference = masked([images[0]], [removed])[0]
        for fill in (float("nan"), float("inf")):
            filled = images[0].clone()
            filled[:, removed == 0] = fill
            assert same_detections(reference, masked([filled], [removed])[0])
        assert not same_detections(reference, plain[0], 1e-3)
        nothing = torch.zeros(80, 96)
        first, second = masked([images[0]], [nothing])[0], masked([torch.randn(3, 80, 96)], [nothing])[0]
        assert same_detections(first, second)  # nothing visible: the same detections for every image
        masked.min_visible = 0.5
        assert all(len(value) == 0 for value in masked([images[0]], [nothing])[0].values())


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detectors_keep_the_invariants_of_layer_masking(name):
    check_invariants(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_DETECTORS))
def test_larger_detectors_keep_the_invariants_of_layer_masking(name):
    check_invariants(name)


def test_conversion_by_parts_leaves_the_model_as_it_was_and_keeps_its_keys():
    model = detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    forwards = {name: module.forward for name, module in model.named_modules()}
    masked = layer_masked(model)
    assert masked.state_dict().keys() == before.keys()
    assert {name: module.forward for name, module in model.named_modules()} == forwards
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected = model(image)[0]
        copied = pickle.loads(pickle.dumps(masked))
        assert same_detections(expected, copied(image, [torch.ones(64, 64)])[0])
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    other = detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.1)
    fresh = layer_masked(other)
    fresh.load_state_dict(masked.state_dict())  # the detector's own keys, both ways
    with torch.no_grad():
        assert same_detections(expected, fresh(image, [torch.ones(64, 64)])[0])


def test_detector_calls_are_checked():
    masked = layer_masked(detector("fasterrcnn_mobilenet_v3_large_320_fpn"))
    image = torch.rand(3, 64, 64)
    with pytest.raises(MaskShapeError, match="does not fit"):
        masked([image], [torch.ones(32, 32)])
    with pytest.raises(MaskShapeError, match="2 masks for 1 images"):
        masked([image], [torch.ones(64, 64)] * 2)
    with pytest.raises(MaskShapeError, match="binary"):
        masked([image], [torch.full((64, 64), 0.5)])
    with pytest.raises(LayerMaskError, match="eval mode"):
        masked.train()([image], [torch.ones(64, 64)])
    with pytest.raises(ValueError, match="min_visible"):
        layer_masked_detector(detector("fasterrcnn_mobilenet_v3_large_320_fpn"), min_visible=2)


def test_a_batch_of_images_with_a_batch_of_masks_is_the_list_call():
    masked = layer_masked(detector("retinanet_resnet50_fpn"))
    images, masks = torch.rand(2, 3, 64, 64), torch.ones(2, 1, 64, 64)
    masks[0, :, :32] = 0
    with torch.no_grad():
        batched = masked(images, masks)
        listed = masked(list(images), list(masks))
    assert all(same_detections(a, b) for a, b in zip(batched, listed))


# ---------------------------------------------------------------------------------------------------------------
# the rules


def roi_align_by_loops(feature, mask, box, scale, size, samples):
    """torchvision's RoI Align (aligned=False) for one box, with removed taps taking the mean of the bin's visible
    taps: ``sum(w m x) / sum(w m) * sum(w) / samples``, written out sample by sample."""
    height, width = feature.shape[-2:]
    x1, y1, x2, y2 = [float(v) * scale for v in box]
    bin_h, bin_w = max(y2 - y1, 1.0) / size, max(x2 - x1, 1.0) / size
    out = torch.zeros(feature.shape[0], size, size, dtype=torch.float64)
    visible_out = torch.zeros(size, size, dtype=torch.bool)
    for ph in range(size):
        for pw in range(size):
            weighted, visible_weight, in_map = torch.zeros(feature.shape[0], dtype=torch.float64), 0.0, 0.0
            for iy in range(samples):
                for ix in range(samples):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / samples
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / samples
                    if y < -1 or y > height or x < -1 or x > width:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
                    y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
                    y, x = (float(y0), x) if y0 >= height - 1 else (y, x)
                    y, x = (y, float(x0)) if x0 >= width - 1 else (y, x)
                    ly, lx = y - y0, x - x0
                    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x1_, (1 - ly) * lx),
                                      (y1_, x0, ly * (1 - lx)), (y1_, x1_, ly * lx)):  # fmt: skip
                        in_map += w
                        if mask[yy, xx] > 0:
                            weighted += w * feature[:, yy, xx].double()
                            visible_weight += w
            if visible_weight > 0:
                out[:, ph, pw] = weighted / visible_weight * in_map / samples**2
            visible_out[ph, pw] = visible_weight > 0 or in_map == 0
    return out, visible_out


def test_roi_align_reads_visible_cells_only_as_computed_by_loops():
    feature = torch.randn(1, 3, 12, 12)
    mask = (torch.rand(1, 1, 12, 12) > 0.4).float()
    mask[..., 6:, 6:] = 0  # a box entirely on removed cells
    boxes = [torch.tensor([[2.0, 3.0, 30.0, 41.0], [0.0, 0.0, 47.0, 47.0], [28.0, 28.0, 44.0, 40.0], [40, 1, 52, 9]])]
    pool = MultiScaleRoIAlign(["0"], output_size=3, sampling_ratio=2)
    got = multiscale_roi_align(pool, {"0": Masked(feature, mask)}, boxes, [(48, 48)])
    for index, box in enumerate(boxes[0]):
        expected, visible = roi_align_by_loops(feature[0], mask[0, 0], box, 0.25, 3, 2)
        assert torch.allclose(got.value[index].double(), expected, atol=1e-5)
        assert torch.equal(got.mask[index, 0] > 0, visible)
    assert not got.mask[2].any()  # nothing visible under the third box: removed, and 0
    assert torch.equal(got.value[2], torch.zeros(3, 3, 3))
    full = multiscale_roi_align(pool, {"0": Masked(feature, torch.ones(1, 1, 12, 12))}, boxes, [(48, 48)])
    assert torch.equal(full.value, pool({"0": feature}, boxes, [(48, 48)])) and bool(full.mask.all())
    direct = roi_align_rule(roi_align, Masked(feature, mask), boxes, 3, spatial_scale=0.25, sampling_ratio=2)
    assert torch.allclose(direct.value, got.value) and torch.equal(direct.mask, got.mask)


def test_box_iou_is_torchvision_s():
    corners = torch.rand(2, 6, 2) * 50
    boxes = torch.cat([corners[0], corners[0] + 1 + 30 * torch.rand(6, 2)], 1)
    others = torch.cat([corners[1], corners[1] + 1 + 30 * torch.rand(6, 2)], 1)
    assert torch.allclose(box_iou(boxes, others), torchvision_box_iou(boxes, others))


def test_the_share_of_a_box_s_visible_pixels_counts_the_pixels_it_touches():
    mask = (torch.rand(20, 30) > 0.5).float()
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [2.5, 3.2, 7.1, 9.9], [29.5, 19.5, 30.0, 20.0], [5.0, 5.0, 5.0, 5.0]])
    for box, share in zip(boxes, visible_share(boxes, mask)):
        x1, y1 = min(int(box[0]), 29), min(int(box[1]), 19)
        x2, y2 = max(int(torch.ceil(box[2])), x1 + 1), max(int(torch.ceil(box[3])), y1 + 1)
        assert float(share) == pytest.approx(float(mask[y1:y2, x1:x2].mean()))


def test_detections_over_removed_pixels_are_dropped_at_min_visible():
    masked = layer_masked(detector("fasterrcnn_mobilenet_v3_large_320_fpn"))
    image, mask = torch.rand(3, 96, 96), torch.ones(96, 96)
    mask[:, :60] = 0
    with torch.no_grad():
        masked.min_visible = 0.0
        every = masked([image], [mask])[0]
        masked.min_visible = 0.5
        kept = masked([image], [mask])[0]
    share = visible_share(every["boxes"], mask)
    assert (share < 0.5).any() and (share >= 0.5).any()
    assert same_detections(kept, {key: value[share >= 0.5] for key, value in every.items()})
    assert same_detections(kept, visible_detections(every, mask, 0.5))


def test_scores_that_no_visible_pixel_reaches_give_the_background_all_probability():
    fill = background_fill(3)
    logits = torch.randn(2, 6, 4, 4)  # two anchors of three classes per cell, SSD's layout
    mask = torch.ones(2, 1, 4, 4)
    mask[0, :, :2] = 0
    probabilities = fill(logits, mask).view(2, 2, 3, 4, 4).softmax(dim=2)
    assert torch.equal(probabilities[0, :, 0, :2], torch.ones(2, 2, 4))
    assert torch.equal(probabilities[0, :, 1:, :2], torch.zeros(2, 2, 2, 4))
    assert torch.allclose(probabilities[:, :, :, 2:], logits.view(2, 2, 3, 4, 4).softmax(dim=2)[:, :, :, 2:])


# ---------------------------------------------------------------------------------------------------------------
# conversion by parts for a model of one's own


class LoopOverLevels(nn.Module):
    """Untraceable: as many levels as the image size allows (Python control flow on a shape, as in detectors)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        levels = [self.stem(x)]
        while levels[-1].shape[-1] > 8:
            levels.append(self.down(levels[-1]))
        return [self.head(level) for level in levels]


class Traceable(LoopOverLevels):
    def forward(self, x):
        first = self.stem(x)
        second = self.down(first)
        return [self.head(first), self.head(second)]


def test_a_model_of_one_s_own_converted_by_parts_equals_its_traced_conversion():
    model, image = LoopOverLevels().eval(), torch.randn(2, 3, 16, 16)
    mask = torch.ones(2, 1, 16, 16)
    mask[0, :, 4:12, 2:9] = 0
    masked = layer_masked(model, capture="parts")
    assert [part.path for part in masked.parts] == ["stem", "down", "head"]
    traced = layer_masked(Traceable().eval(), capture="fx")
    traced.load_state_dict(model.state_dict())
    with torch.no_grad():
        for got, expected in zip(masked(image, mask), traced(image, mask)):
            assert torch.allclose(got, expected, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(masked(image), model(image)))


class ComputedBetweenParts(LoopOverLevels):
    def forward(self, x):
        return self.head(self.stem(x) * 2)  # the product is computed outside any part


def test_a_registered_part_model_class_converts_by_parts_until_unregistered():
    build = register_part_model(LoopOverLevels, build_parts)
    try:
        assert isinstance(layer_masked(LoopOverLevels().eval()), LayerMaskedParts)
    finally:
        unregister(build)
    with pytest.raises(TracingError):
        layer_masked(LoopOverLevels().eval(), capture="fx")
    with pytest.raises(KeyError):
        unregister(build)


class OwnWeightInALoop(nn.Module):
    """A parameter of its own used in shape-dependent Python: neither traceable nor splittable into children."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, x):
        while x.shape[-1] > 8:
            x = F.avg_pool2d(x * self.scale, 2)
        return x


def test_a_module_with_its_own_parameters_that_does_not_trace_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), OwnWeightInALoop()).eval()
    with pytest.raises(UnsupportedLayerError, match="'1' \\(OwnWeightInALoop\\) holds parameters of its own"):
        layer_masked(model, capture="parts")
    with pytest.raises(UnsupportedLayerError, match="'OwnWeightInALoop' .* holds parameters of its own"):
        layer_masked(OwnWeightInALoop().eval(), capture="parts")


def test_a_part_given_a_tensor_no_part_produced_refuses_to_guess():
    masked = layer_masked(ComputedBetweenParts().eval(), capture="parts")
    with pytest.raises(LayerMaskError, match="'head' received a tensor that no converted part produced"):
        masked(torch.randn(1, 3, 8, 8), torch.ones(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# explaining one detection


def target_detection(masked, image):
    with torch.no_grad():
        found = masked([image], [torch.ones(image.shape[-2:])])[0]
    return found["boxes"][0], int(found["labels"][0])


class Recorder(nn.Module):
    """Forwards to DetectionScores and checks every evaluation against a direct masked call."""

    def __init__(self, scores, masked, image):
        super().__init__()
        self.scores, self.masked, self.image = scores, masked, image
        self.samples = 0

    def forward(self, x):
        out = self.scores(x)
        for index in range(len(x)):
            keep = mask_from_baseline(x[index : index + 1])
            keep = torch.ones(self.image.shape[-2:]) if keep is None else keep[0, 0]
            with torch.no_grad():
                found = self.masked([self.image], [keep])[0]
            same = found["labels"] == self.scores.label
            overlap = _iou(found["boxes"][same], self.scores.box)
            expected = (overlap * found["scores"][same]).max() if same.any() else torch.tensor(0.0)
            assert torch.allclose(out[index], expected, atol=1e-6)
            self.samples += 1
        return out


def _iou(boxes, box):
    x1, y1 = torch.maximum(boxes[:, 0], box[0]), torch.maximum(boxes[:, 1], box[1])
    x2, y2 = torch.minimum(boxes[:, 2], box[2]), torch.minimum(boxes[:, 3], box[3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def quarters(size=64):
    cells = torch.arange(16).reshape(4, 4)
    return cells.repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1)[None, None]


def test_lime_on_one_detection_scores_every_perturbation_as_a_direct_masked_call():
    masked = layer_masked(detector("fasterrcnn_mobilenet_v3_large_320_fpn"))
    image = torch.rand(3, 64, 64)
    box, label = target_detection(masked, image)
    recorder = Recorder(DetectionScores(masked, box, label), masked, image)
    attr = Lime(recorder).attribute(
        image[None], feature_mask=quarters(), baselines=LayerMask(), n_samples=12, perturbations_per_eval=4
    )
    assert recorder.samples >= 12 and attr.shape == (1, 3, 64, 64) and attr.isfinite().all()


@pytest.mark.parametrize("layer_mask", [True, False])
def test_feature_ablation_of_a_detection_is_the_hand_computed_drop(layer_mask):
    model = detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    masked = layer_masked(model)
    image, segments = torch.rand(3, 64, 64), quarters()
    box, label = target_detection(masked, image)
    scores = DetectionScores(masked if layer_mask else model, box, label)
    attr = FeatureAblation(scores).attribute(
        image[None], feature_mask=segments, baselines=LayerMask() if layer_mask else 0.5, perturbations_per_eval=3
    )
    with torch.no_grad():
        before = scores(image[None])
        for feature in range(16):
            keep = (segments != feature)[0, 0]
            if layer_mask:
                found = masked([image], [keep])[0]
            else:
                found = model([torch.where(keep, image, 0.5)])[0]
            same = found["labels"] == label
            after = (_iou(found["boxes"][same], box) * found["scores"][same]).max() if same.any() else 0.0
            got = attr[0, :, segments[0, 0] == feature]
            assert torch.allclose(got, (before - after).expand_as(got), atol=1e-5)


def test_detection_scores_refuse_a_plain_detector_given_layer_mask_and_a_bad_box():
    model = detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(LayerMaskError, match="not layer-masked"):
        FeatureAblation(DetectionScores(model, [0, 0, 10, 10], 1)).attribute(
            image, feature_mask=quarters(), baselines=LayerMask()
        )
    with pytest.raises(MaskShapeError, match="box must be"):
        DetectionScores(model, [0, 0, 10], 1)


# ---------------------------------------------------------------------------------------------------------------
# the demo detector and the evaluation


def test_average_precision_is_the_area_under_the_monotone_precision_recall_curve():
    objects = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    targets = [{"boxes": objects, "labels": torch.tensor([1, 1, 1])}]
    found = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 31], [60, 60, 70, 70], [40, 40, 50, 50]])
    detections = [
        {"boxes": found, "labels": torch.tensor([1, 1, 1, 1, 2]), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])}
    ]
    # by score: hit, duplicate (a miss), hit, miss; the class-2 box is another class's: precision 1, 1/2, 2/3, 1/2
    expected = (1 / 3) * 1.0 + (1 / 3) * (2 / 3)
    assert average_precision(detections, targets, 1) == pytest.approx(expected)
    assert average_precision(detections, targets, 2) != average_precision(detections, targets, 2)  # NaN: no object
    assert mean_average_precision(detections, targets, [1, 2]) == pytest.approx(expected)


def test_objects_mostly_removed_are_neither_to_be_found_nor_false_detections():
    object_masks = torch.zeros(1, 2, 32, 32, dtype=torch.bool)
    object_masks[0, 0, 2:10, 2:10] = object_masks[0, 1, 20:30, 20:30] = True
    targets = [{"boxes": torch.tensor([[2.0, 2, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2])}]
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 16:, :] = 0  # the second object is removed
    kept, ignored = visible_targets(targets, object_masks, mask)
    assert kept[0]["labels"].tolist() == [1] and ignored[0]["labels"].tolist() == [2]
    found = {"boxes": targets[0]["boxes"], "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8])}
    assert without_ignored(found, ignored[0])["labels"].tolist() == [1]


def test_the_demo_detector_finds_held_out_shapes_and_converts():
    model = load_demo_detector()
    scenes = shapes.segmentation_scenes(100, torch.Generator().manual_seed(11))
    targets = shapes.detection_targets(scenes)
    found = detect(model, scenes.images, torch.ones(100, 1, 128, 128), "layer")
    assert mean_average_precision(found, targets, range(1, 7)) > 0.85
    with torch.no_grad():
        plain = model(list(scenes.images[:8]))
    assert all(same_detections(a, b, 1e-4) for a, b in zip(plain, found[:8]))


def test_the_detection_report_prints_its_tables_and_draws_its_figure(tmp_path, capsys, monkeypatch):
    from captum_layermask.evaluation import detection_report

    figure = tmp_path / "detection.png"
    arguments = ["detection_report", "--scenes", "4", "--lime-scenes", "1", "--samples", "10", "--figure", str(figure)]
    monkeypatch.setattr("sys.argv", arguments)
    detection_report.main()
    printed = capsys.readouterr().out
    assert "mAP@0.5 under random removal" in printed and "share of Lime's top 5 patches" in printed
    assert figure.stat().st_size > 10_000
