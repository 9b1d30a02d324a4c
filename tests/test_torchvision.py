"""Every torchvision CNN family converts automatically and has the properties of layer masking.

Random weights with non-trivial BatchNorm statistics, small resolution, per-sample random patch masks.
"""

import pytest
import torch
import torchvision

from captum_layermask.testing import check_layer_masking

from .helpers import FAMILIES, MEAN, STD, build, patch_masks, randomize_batchnorm


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    model, masked, x, mask = build(name)
    check_layer_masking(model, x, mask, masked)
    with torch.no_grad():
        assert not torch.equal(masked(x, mask), masked(x, torch.ones_like(mask)))  # the mask is not ignored
        black, grey = torch.where(mask, x, -MEAN / STD), torch.where(mask, x, 0.0)
        assert not torch.equal(model(black), model(grey))  # the plain model sees the fill; layer masking does not


def classification_models():
    return sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.slow
@pytest.mark.parametrize("name", classification_models())
def test_every_torchvision_classifier(name):
    """All 80 classifiers, CNNs and transformers (token dropping), keep every property at 224x224 (inception at
    299)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name).eval())
    size = 299 if name == "inception_v3" else 224
    x, mask = torch.randn(1, 3, size, size), patch_masks(1, size, size, patch=16)
    check_layer_masking(model, x, mask)
