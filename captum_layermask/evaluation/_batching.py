"""Shared plumbing of the diagnostics and the evaluation: devices, batches, progress bars, features."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..core.errors import LayerMaskError

FeatureLayer = Union[None, str, nn.Module]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def batches(count: int, batch_size: int, progress: tqdm) -> Iterator[slice]:
    """Slices of ``range(count)`` of at most ``batch_size``, advancing ``progress`` by each one's length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        yield slice(start, stop)
        progress.update(stop - start)


def progress_bar(total: int, description: str, show: bool) -> tqdm:
    """A progress bar over ``total`` images (a disabled one when ``show`` is False); use it in a ``with``."""
    return tqdm(total=total, desc=description, unit="img", leave=False, disable=not show)


def box_masks(height: int, width: int, boxes: Sequence[Tuple[int, int, int, int]]) -> Tensor:
    """Masks ``(len(boxes), 1, height, width)`` bool, True inside each ``(top, left, box_height, box_width)``."""
    masks = torch.zeros(len(boxes), 1, height, width, dtype=torch.bool)
    for index, (top, left, box_height, box_width) in enumerate(boxes):
        masks[index, :, top : top + box_height, left : left + box_width] = True
    return masks


class FeatureReader:
    """Reads a model's features: the input of its final classifier layer, or another layer's.

    Used as a context manager around the forward passes it reads; the hook it registers is removed on exit.

    Args:
        model (nn.Module): the plain model (or a layer-masked one, which shares its layers).
        feature_layer: None to detect the classifier (the last ``nn.Linear`` that runs in a forward pass of
            ``probe``), a submodule name (``"fc"``) or the module itself, whose input (``(N, F)``) is read; or
            ``"output"`` for the model's output.
        probe (Tensor): one model input, run once to find the classifier.
    """

    def __init__(self, model: nn.Module, feature_layer: FeatureLayer, probe: Tensor) -> None:
        self.read_output = feature_layer == "output"
        self.module: Optional[nn.Module] = None
        if not self.read_output:
            self.module = self._find(model, feature_layer, probe)
        self.captured: Optional[Tensor] = None
        self._handle: Any = None

    @staticmethod
    def _find(model: nn.Module, feature_layer: FeatureLayer, probe: Tensor) -> nn.Module:
        if isinstance(feature_layer, nn.Module):
            return feature_layer
        if isinstance(feature_layer, str):
            try:
                return model.get_submodule(feature_layer)
            except AttributeError:
                raise LayerMaskError(
                    f"the model has no submodule {feature_layer!r}; pass a name from model.named_modules() or 'output'."
                ) from None
        ran = []
        handles = [
            module.register_forward_pre_hook(lambda module, args: ran.append(module))
            for module in model.modules()
            if isinstance(module, nn.Linear)
        ]
        try:
            with torch.no_grad():
                model(probe)
        finally:
            for handle in handles:
                handle.remove()
        if not ran:
            raise LayerMaskError(
                "no nn.Linear runs in the model, so its classifier is not found; pass feature_layer= (a submodule name, or 'output')."
            )
        return ran[-1]

    def __enter__(self) -> FeatureReader:
        if self.module is not None:
            self._handle = self.module.register_forward_pre_hook(self._capture)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self.captured = args[0]

    def read(self, forward: Callable[[Tensor, Tensor], Any], x: Tensor, mask: Tensor) -> Tensor:
        """Features ``(N, F)`` of ``forward(x, mask)``."""
        self.captured = None
        output = forward(x, mask)
        features = output if self.read_output else self.captured
        if not isinstance(features, Tensor):
            raise LayerMaskError(
                "the masker's forward pass did not run the feature layer; pass feature_layer= a layer it runs, or 'output'."
            )
        if features.ndim != 2:
            raise LayerMaskError(
                f"features must be (N, F) vectors, but the feature layer's input has shape {tuple(features.shape)}; pass feature_layer= a layer that takes feature vectors."
            )
        return features.detach().float()
