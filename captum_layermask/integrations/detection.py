"""``DetectionScores``: a detector as one score per image, how well it still finds a chosen detection: the target
Captum's perturbation methods explain (D-RISE, Petsiuk et al., CVPR 2021, with layer masking instead of grey
fill)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import MaskShapeError


def box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """Intersection over union of every pair of boxes ``(x1, y1, x2, y2)``: ``(K, 4)`` and ``(M, 4)`` give
    ``(K, M)`` (torchvision's ``box_iou``, here so that ``import captum_layermask`` needs torch only)."""
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    area_others = (others[:, 2:] - others[:, :2]).prod(-1)
    return inter / (area[:, None] + area_others[None] - inter)


def match_score(found: Dict[str, Tensor], box: Tensor, label: int) -> Tensor:
    """How well one image's detections match a target detection: the best ``IoU(box_j, box) * score_j`` over the
    detections ``j`` of the target's class, 0 if there is none.

    D-RISE's similarity is ``IoU x cosine(class probabilities) x objectness``; torchvision's detectors return one
    class and its probability per detection, so the class term is that probability for the target's class and 0
    for any other, and the objectness is part of it.

    Args:
        found: a detector's dict for one image (``boxes`` ``(K, 4)``, ``labels`` ``(K,)``, ``scores`` ``(K,)``).
        box (Tensor): ``(4,)`` as ``(x1, y1, x2, y2)``.
        label (int): the target's class.

    Returns:
        A 0-d tensor in ``[0, 1]``.
    """
    same = found["labels"] == label
    if not bool(same.any()):
        return box.new_zeros(())
    overlap = box_iou(found["boxes"][same], box[None].to(found["boxes"].dtype))[:, 0]
    return (overlap * found["scores"][same]).max().to(box.dtype)


class DetectionScores(nn.Module):
    """A detector as one score per image, ``(N,)``: how well its detections on the image match a target detection
    (:func:`match_score`, D-RISE's similarity).

    With a layer-masked detector (:func:`~captum_layermask.layer_masked`) and Captum's ``LayerMask()`` baseline, the
    detector runs on the pixels each perturbation keeps; with the plain detector and a colour baseline, on the
    filled image (D-RISE's grey), to compare.

    Args:
        detector (nn.Module): a torchvision-style detector taking a list of ``(3, H, W)`` images and returning a
            list of dicts with ``boxes``, ``labels`` and ``scores``; layer-masked or plain.
        box (Tensor or sequence): the target detection's box ``(x1, y1, x2, y2)`` in pixels.
        label (int): the target detection's class.

    Examples::

        >>> found = masked([image])[0]                       # pick one detection
        >>> scores = DetectionScores(masked, found["boxes"][0], int(found["labels"][0]))
        >>> attr = Lime(scores).attribute(image[None], feature_mask=segments, baselines=LayerMask())
    """

    def __init__(self, detector: nn.Module, box: Any, label: int) -> None:
        super().__init__()
        box = torch.as_tensor(box, dtype=torch.float32)
        if box.shape != (4,):
            raise MaskShapeError(f"box must be (x1, y1, x2, y2), got shape {tuple(box.shape)}.")
        self.detector, self.label = detector, int(label)
        self.register_buffer("box", box, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N,)`` of the image batch ``x`` ``(N, 3, H, W)``."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise MaskShapeError(f"DetectionScores takes an image batch (N, 3, H, W), got {_describe(x)}.")
        found: List[Dict[str, Tensor]] = self.detector(list(x))
        box = self.box.to(x.device, x.dtype)
        return torch.stack([match_score(item, box, self.label) for item in found])

    def extra_repr(self) -> str:
        return f"box={[round(float(v), 1) for v in self.box]}, label={self.label}"


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


__all__: Sequence[str] = ["DetectionScores", "match_score"]
